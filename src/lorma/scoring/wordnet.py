"""WordNet 3.0 for METEOR without a download: Debian's ``wordnet-base`` folder read with nltk's reader.

Looked for in ``$LORMA_WORDNET_DIR``, then Debian's ``/usr/share/wordnet`` (``apt-get install wordnet-base``),
then nltk's own ``wordnet`` corpus. Written here because nltk's reader expects its own downloaded layout.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["DEBIAN_WORDNET_DIR", "WordNetUnavailableError", "load_wordnet"]

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")


class WordNetUnavailableError(RuntimeError):
    """METEOR was asked for but no WordNet data can be found offline."""



# The 45 lexicographer file names of WordNet 3.0, in file-number order (the `lexnames` table of the
# WordNet database format, lexnames(5WN)). Debian's wordnet-base ships the database but not this small
# index, which nltk's reader insists on opening; METEOR never looks at it.
_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity",
    "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body",
    "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception",
    "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_REQUIRED_WORDNET_FILES = ("data.noun", "index.noun", "data.verb", "index.verb", "data.adj", "index.adj",
                           "data.adv", "index.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc")
_wordnet_lock = threading.Lock()


def _wordnet_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("LORMA_WORDNET_DIR"):
        dirs.append(Path(os.environ["LORMA_WORDNET_DIR"]))
    dirs.append(DEBIAN_WORDNET_DIR)
    return dirs


@lru_cache(maxsize=1)
def load_wordnet() -> Any:
    """A WordNet reader for METEOR that needs no download.

    Looks in ``$LORMA_WORDNET_DIR``, then Debian's ``/usr/share/wordnet`` (``apt-get install
    wordnet-base``), then nltk's own ``wordnet`` corpus. Raises :class:`WordNetUnavailableError`
    naming what is missing.
    """
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _DictFolderWordNet(WordNetCorpusReader):
        """nltk's reader over a plain WordNet 3.0 ``dict`` folder (as Debian installs it)."""

        def open(self, fileid: str) -> Any:
            if fileid == "lexnames" and not (Path(str(self._root)) / "lexnames").exists():
                text = "".join(
                    f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES)
                )
                return io.StringIO(text)
            return super().open(fileid)

        def map_wn(self, version: str = "wordnet") -> None:
            # The mapping only serves the Open Multilingual Wordnet, which METEOR does not use; nltk
            # would otherwise look for its own downloaded copy to build it.
            return None

    checked = []
    for folder in _wordnet_dirs():
        missing = [f for f in _REQUIRED_WORDNET_FILES if not (folder / f).is_file()]
        if missing:
            checked.append(f"{folder} (missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''})")
            continue
        with _wordnet_lock:
            resolved = str(folder.resolve())
            if resolved not in [str(p) for p in nltk.data.path]:
                nltk.data.path.append(resolved)  # nltk only opens corpora under its data paths
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions are not available"
                return _DictFolderWordNet(nltk.data.FileSystemPathPointer(resolved), None)
    try:
        return _nltk_wordnet()
    except (LookupError, OSError, PermissionError, ValueError):
        checked.append("nltk's 'wordnet' corpus (not installed)")
    raise WordNetUnavailableError(
        "METEOR needs WordNet 3.0 data and none was found: install Debian's package "
        "(`apt-get install --no-install-recommends wordnet-base`, which fills /usr/share/wordnet) or set "
        "LORMA_WORDNET_DIR to a WordNet dict folder. Looked in: " + "; ".join(checked)
    )


def _nltk_wordnet() -> Any:
    """nltk's own downloaded ``wordnet`` corpus (LookupError when it is not installed)."""
    from nltk.corpus import wordnet

    wordnet.ensure_loaded()
    return wordnet
