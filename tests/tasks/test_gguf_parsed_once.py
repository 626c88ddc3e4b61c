"""``gguf_parsed_once``: inside the block a GGUF file is parsed once and gguf's tensor-name map built once; outside
it gguf is as it was. (That a model loaded inside it is the same model: the real SmolLM2 tests load the checkpoint
that conftest's ``smollm2_plain`` converts through it, and llama.cpp serves it with the same logits.)"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lorma.tasks.generation import gguf_parsed_once  # noqa: E402


def _tiny_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("lorma.test.value", 7)
    writer.add_tensor("blk.0.attn_q.weight", np.arange(8, dtype=np.float32).reshape(2, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_one_parse_and_one_name_map_inside_and_gguf_restored_after(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same file, however named
        with gguf_parsed_once():  # nested: still the outer block's parse
            assert gguf.GGUFReader(path) is first
        assert gguf.GGUFReader(path) is first
        assert first.fields["lorma.test.value"].contents() == 7
        np.testing.assert_array_equal(first.tensors[0].data, np.arange(8, dtype=np.float32).reshape(2, 4))
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 2).get_name("model.layers.0.self_attn.q_proj") == "blk.0.attn_q"
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map
    again = gguf.GGUFReader(path)
    assert again is not first and again.fields["lorma.test.value"].contents() == 7


def test_an_error_inside_restores_gguf(tmp_path: Path) -> None:
    reader = gguf.GGUFReader
    with pytest.raises(RuntimeError, match="inside"), gguf_parsed_once():
        raise RuntimeError("inside")
    assert gguf.GGUFReader is reader


def test_another_thread_waits_for_the_block(tmp_path: Path) -> None:
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    seen: list[bool] = []
    with gguf_parsed_once():
        first = gguf.GGUFReader(path)

        def other() -> None:
            with gguf_parsed_once():  # its own block, after this one: a parse of its own
                seen.append(gguf.GGUFReader(path) is first)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive()  # blocked while this thread holds gguf
    thread.join(timeout=30)
    assert seen == [False]
