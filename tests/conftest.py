"""Triton decides when it is first imported whether @triton.jit functions (its
own included) run in its CPU interpreter. On a machine without a GPU, import
it here under TRITON_INTERPRET=1, so tests/test_attention.py can run the real
kernels on CPU; then unset the variable, so that every other test uses PyTorch
attention, as a CPU user would (attention.py routes CPU tensors to the kernels
only while TRITON_INTERPRET=1 is set)."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import attention  # noqa: F401  (its kernels are defined now, interpreted)
    except ImportError:
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


@pytest.fixture
def micro_folder(tmp_path):
    """A folder of micro checkpoints (every method up to naive) and one micro scene.json."""
    from test_bench import micro_checkpoints  # test modules import attention: after the set-up above
    from test_sample import MICRO_SCENE
    micro_checkpoints(tmp_path)
    (tmp_path / "scene.json").write_text(json.dumps(MICRO_SCENE))
    return tmp_path
