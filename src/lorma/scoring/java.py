"""The Java half of the official data-to-text scorers: METEOR 1.5 and the Stanford PTB tokenizer.

Both official scorers run Java programs: the E2E scorer (tuetschek/e2e-metrics) tokenizes with Stanford
CoreNLP's ``PTBTokenizer`` before METEOR, ROUGE-L and CIDEr, and runs METEOR 1.5 with its English paraphrase
table; WebNLG's GenerationEval runs the same METEOR 1.5 jar on files. The jars and the paraphrase table
come from the ``pycocoevalcap`` package on PyPI (the E2E scorer's own copy of the same files), so nothing
is downloaded at run time. What is needed besides is a Java runtime on ``PATH`` (``make install`` puts
Debian's headless JRE there); without one, :func:`find_java` raises :class:`JavaUnavailableError` saying
what to install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "JAVA_INSTALL_HINT",
    "JavaUnavailableError",
    "OfficialScorerError",
    "find_java",
    "meteor_file_score",
    "meteor_stdio_score",
    "ptb_tokenize",
]

JAVA_INSTALL_HINT = (
    "install a Java runtime (Debian/Ubuntu: `apt-get install --no-install-recommends default-jre-headless`, "
    "which `make install` runs), or ask for the approximate scorers (`lorma evaluate --scorer approximate`, "
    "`--task-option scorer=approximate` for training), whose numbers are not comparable with published ones"
)


class JavaUnavailableError(RuntimeError):
    """An official scorer needs Java (METEOR 1.5, the PTB tokenizer) and no working ``java`` was found."""


class OfficialScorerError(RuntimeError):
    """An official scorer's program or files are missing, or it ran and failed."""


@lru_cache(maxsize=8)
def _checked_java(path_env: str) -> str:
    java = shutil.which("java", path=path_env)
    if java is None:
        raise JavaUnavailableError(f"the official scorer runs METEOR 1.5 / the PTB tokenizer in Java and there is "
                                   f"no `java` on PATH: {JAVA_INSTALL_HINT}")
    try:
        probe = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise JavaUnavailableError(f"{java} does not run ({err}): {JAVA_INSTALL_HINT}") from None
    if probe.returncode != 0:
        raise JavaUnavailableError(f"`{java} -version` failed ({probe.stderr.strip()[:200]}): {JAVA_INSTALL_HINT}")
    return java


def find_java() -> str:
    """The ``java`` that the official scorers will run (the first on ``PATH``, as they run it), checked once."""
    return _checked_java(os.environ.get("PATH", os.defpath))


@lru_cache(maxsize=1)
def _pycocoevalcap_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise OfficialScorerError("the official scorers need the `pycocoevalcap` package (its METEOR 1.5 and "
                                  "PTB tokenizer jars): `pip install pycocoevalcap==1.2`")
    return Path(next(iter(spec.submodule_search_locations)))


def _jar(relative: str) -> Path:
    path = _pycocoevalcap_dir() / relative
    if not path.is_file():
        raise OfficialScorerError(f"{path} is missing from the installed pycocoevalcap; reinstall it "
                                  "(`pip install --force-reinstall pycocoevalcap==1.2`)")
    return path


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Each text through Stanford's PTBTokenizer as pycocoevalcap runs it (``-preserveLines -lowerCase``),
    then without the punctuation tokens that pycocoevalcap drops; tokens joined by single spaces.

    pycocoevalcap's own ``PTBTokenizer`` class writes its temporary file inside the installed package
    (which fails where site-packages is read-only) and reports no failure; this runs the same jar with the
    same options and the same punctuation list on a file in a temporary folder.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    java = find_java()
    jar = _jar("tokenizer/stanford-corenlp-3.4.1.jar")
    if not texts:
        return []
    text = "\n".join(t.replace("\n", " ") for t in texts)
    with tempfile.TemporaryDirectory(prefix="lorma-ptb-") as tmp:
        src = Path(tmp) / "sentences.txt"
        src.write_bytes(text.encode("utf-8"))
        done = subprocess.run(
            [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
             src.name],
            cwd=tmp, capture_output=True,
        )
    if done.returncode != 0:
        raise OfficialScorerError(f"the PTB tokenizer failed: {done.stderr.decode('utf-8', 'replace')[-500:]}")
    lines = done.stdout.decode("utf-8").split("\n")
    if len(lines) < len(texts) and all(not t.strip() for t in texts[len(lines):]):
        lines += [""] * (len(texts) - len(lines))  # trailing empty texts can come back as no line at all
    if len(lines) < len(texts):
        raise OfficialScorerError(f"the PTB tokenizer returned {len(lines)} lines for {len(texts)} texts")
    punctuation = set(PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punctuation) for line in lines[: len(texts)]]


_METEOR_LOCK = threading.Lock()
#: (the process that started it, pycocoevalcap's Meteor)
_kept_meteor: tuple[int, Any] | None = None


def _meteor_server() -> Any:
    """pycocoevalcap's ``Meteor`` (METEOR 1.5 in ``-stdio`` mode, one JVM), started on the first call and kept for
    the next ones in this process: a start costs about 10 s here (METEOR reads its paraphrase table), scoring a
    few hundred inputs well under a second, and a process that scores several times (a study's worker, a test
    session) paid the start every time. Keeping it changes no number: each call sends its own ``SCORE`` lines and
    an ``EVAL`` over exactly their statistics. A process forked from this one starts a JVM of its own (the pipes
    are the parent's); a forked copy collected there leaves the parent's JVM alone (``Popen`` signals only its own
    children). The JVM ends when the process that started it does (its stdin closes). Call with ``_METEOR_LOCK``
    held."""
    global _kept_meteor
    from pycocoevalcap.meteor.meteor import Meteor

    if _kept_meteor is not None:
        owner, kept = _kept_meteor
        if owner == os.getpid() and kept.meteor_p.poll() is None:
            return kept
    _kept_meteor = (os.getpid(), Meteor())
    return _kept_meteor[1]


def meteor_stdio_score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus METEOR 1.5 (``-l en -norm``, fraction 0-1) as the E2E scorer computes it: pycocoevalcap's
    ``Meteor`` wrapper, one ``SCORE`` line per input (all its references), then ``EVAL`` over all the
    statistics (an aggregate over the corpus, not a mean of per-input scores). The JVM is kept for the next
    call in this process (:func:`_meteor_server`)."""
    global _kept_meteor
    find_java()
    _jar("meteor/meteor-1.5.jar")
    _jar("meteor/data/paraphrase-en.gz")

    keys = list(range(len(hypotheses)))
    with _METEOR_LOCK:
        scorer = _meteor_server()
        try:
            score, _ = scorer.compute_score(
                {k: list(references[k]) for k in keys}, {k: [hypotheses[k]] for k in keys}
            )
        except (ValueError, OSError) as err:  # the JVM died: its answer is an empty line or a broken pipe
            scorer.meteor_p.kill()
            detail = scorer.meteor_p.stderr.read().decode("utf-8", "replace")[-500:]
            if scorer.lock.locked():  # compute_score does not release its lock when it fails
                scorer.lock.release()
            _kept_meteor = None  # the next call starts a new JVM
            raise OfficialScorerError(f"METEOR 1.5 failed ({err}): {detail}") from None
    return float(score)


_FINAL_SCORE = re.compile(r"^Final score:\s+(\S+)\s*$", re.MULTILINE)


def meteor_file_score(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus METEOR 1.5 (fraction 0-1) as GenerationEval computes it: the jar on a hypothesis file and a
    reference file holding the same number of references for every hypothesis, ``-l en -norm -r N``,
    its ``Final score``."""
    java = find_java()
    jar = _jar("meteor/meteor-1.5.jar")
    _jar("meteor/data/paraphrase-en.gz")
    widths = {len(group) for group in references}
    if len(widths) != 1:
        raise ValueError(f"METEOR's file mode needs as many references for every hypothesis, got {sorted(widths)}")
    (num_refs,) = widths
    with tempfile.TemporaryDirectory(prefix="lorma-meteor-") as tmp:
        hyp_file, ref_file = Path(tmp) / "hypothesis", Path(tmp) / "reference"
        hyp_file.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
        ref_file.write_text("".join(r + "\n" for group in references for r in group), encoding="utf-8")
        done = subprocess.run(
            [java, "-Xmx2G", "-jar", str(jar), str(hyp_file), str(ref_file), "-l", "en", "-norm", "-r",
             str(num_refs)],
            capture_output=True,
        )
    out = done.stdout.decode("utf-8", "replace")
    found = _FINAL_SCORE.search(out)
    if done.returncode != 0 or found is None:
        raise OfficialScorerError(f"METEOR 1.5 failed: {done.stderr.decode('utf-8', 'replace')[-500:]}")
    return float(found.group(1))
