"""Files from elsewhere never run code when loaded: teacher weights (pickled state dicts and
TorchScript archives, OpenAI's release format) and our checkpoints' per-rank RNG files.

Where a trusting load (``torch.load(weights_only=False)``, ``torch.jit.load``) would run a
malicious file's payload, the test first shows that it does: the refusals are of payloads that work.
"""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from conftest import launch
from tinyclip_ds.config import RecipeError
from tinyclip_ds.models.config import TeacherConfig
from tinyclip_ds.models.teachers import load_teacher, read_torchscript
from tinyclip_ds.train.checkpoint import complete_checkpoints
from tinyclip_ds.train.consolidate import consolidated_state_dict
from tinyclip_ds.train.rng import rng_state, set_rng_state
from test_teacher_equivalence import (SMALL_OPENAI, assert_matches_open_clip, open_clip_library,
                                      save_torchscript)


class WritesAFile:
    """A pickle payload: unpickling it writes ``marker`` (as ``os.system`` could do anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


class SetstateWritesAFile(nn.Module):
    """A module whose TorchScript ``__setstate__``, which torch.jit.load runs, writes a file."""

    def __init__(self, marker: Path):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.marker = str(marker)

    @torch.jit.export
    def __getstate__(self) -> Tuple[Tensor, str, bool]:
        return self.weight, self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[Tensor, str, bool]) -> None:
        self.weight, self.marker, self.training = state
        torch.save(self.weight, self.marker)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def openai_state() -> dict[str, Tensor]:
    """A small OpenAI-layout state dict (open_clip's CLIP keeps OpenAI's names)."""
    return open_clip_library(SMALL_OPENAI).state_dict()


def openai_teacher(path: Path) -> TeacherConfig:
    return TeacherConfig(source="openai", path=str(path))


# --------------------------------------------------------------------------- teacher weights

def test_pickled_payload_in_a_teacher_file_is_refused_unrun(tmp_path):
    marker, weights = tmp_path / "pwned", tmp_path / "teacher.pt"
    torch.save({**openai_state(), "payload": WritesAFile(marker)}, weights)
    torch.load(weights, weights_only=False)
    assert marker.exists(), "the payload does not work: the test would prove nothing"
    marker.unlink()

    with pytest.raises(RecipeError) as error:
        load_teacher(openai_teacher(weights))
    message = str(error.value)
    assert message.startswith(f"teacher.path: {weights}: holds Python objects") and "\n" not in message
    assert "(exec)" in message  # the callable the payload names
    assert not marker.exists()


def test_torchscript_setstate_is_not_run(tmp_path):
    """An OpenAI-looking archive with one module whose __setstate__ writes a file."""
    marker, archive = tmp_path / "pwned", tmp_path / "ViT-B-32.pt"
    save_torchscript(openai_state(), archive, extra={"visual.extra": SetstateWritesAFile(marker)})
    torch.jit.load(str(archive))
    assert marker.exists(), "torch.jit.load did not run the archive's code: the test would prove nothing"
    marker.unlink()

    with pytest.raises(RecipeError, match=r"^teacher\.path: TorchScript archive .* restores its state "
                                          r"with its own TorchScript code, which tinyclip_ds does not run"):
        load_teacher(openai_teacher(archive))
    assert not marker.exists()


def test_torchscript_archive_with_a_pickled_payload_is_refused_unrun(tmp_path):
    """An archive whose data.pkl was replaced by a pickle payload (torch.jit.load itself rejects
    it, but a reader that unpickles data.pkl with Python's pickle would run it)."""
    marker, good, bad = tmp_path / "pwned", tmp_path / "good.pt", tmp_path / "bad.pt"
    save_torchscript(openai_state(), good)
    payload = io.BytesIO()
    torch.save(WritesAFile(marker), payload)  # a zip whose archive/data.pkl is the payload
    pickled = zipfile.ZipFile(payload).read("archive/data.pkl")
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as target:
        for item in source.infolist():
            data = pickled if item.filename.endswith("/data.pkl") else source.read(item)
            target.writestr(item, data)

    with pytest.raises(RecipeError, match=r"^teacher\.path: TorchScript archive .*: holds Python objects "
                                          r"besides tensors and plain data \(exec\)"):
        load_teacher(openai_teacher(bad))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_traced_archive_reads_like_jit_load_and_tells_its_activation(quick_gelu, tmp_path):
    """OpenAI's releases are traced modules: a traced open_clip CLIP gives exactly the state dict
    torch.jit.load gives, and its QuickGELU / GELU classes tell the teacher's activation."""
    library = open_clip_library({**SMALL_OPENAI, "quick_gelu": quick_gelu})
    images, ids = torch.randn(1, 3, 64, 64), torch.randint(0, 100, (1, 24))
    traced = torch.jit.trace_module(library, {"encode_image": (images,), "encode_text": (ids,)},
                                    check_trace=False)
    traced.save(str(tmp_path / "traced.pt"))
    expected = torch.jit.load(str(tmp_path / "traced.pt")).state_dict()

    state = read_torchscript(tmp_path / "traced.pt")
    assert state.keys() == expected.keys() and len(state) > 50
    for name, value in expected.items():
        assert torch.equal(state[name], value), name

    # An OpenAI-layout archive (no attn_mask buffer) with the same activation module.
    del state["attn_mask"]
    save_torchscript(state, tmp_path / "openai.pt",
                     extra={"activation": library.visual.transformer.resblocks[0].mlp.gelu})
    teacher = load_teacher(openai_teacher(tmp_path / "openai.pt"))
    assert not any("activation" in note for note in teacher.assumptions)
    assert_matches_open_clip({"traced archive": teacher.clip}, library)


# --------------------------------------------------------------------------- checkpoints

def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.normal()  # numpy caches a gaussian: part of its state
    torch.save({"rng": rng_state()}, tmp_path / "rank_00000.pt")
    expected = (torch.rand(3), random.random(), np.random.normal(), np.random.rand(2))
    set_rng_state(torch.load(tmp_path / "rank_00000.pt", weights_only=True)["rng"])
    got = (torch.rand(3), random.random(), np.random.normal(), np.random.rand(2))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]
    assert np.array_equal(got[3], expected[3])


FAST = ["--set", "train.micro_batch=4", "--set", "train.global_batch=8", "--set", "train.accumulation=0",
        "--set", "train.steps=2", "--set", "train.log_every=1", "--set", "eval.every=0", "--set", "eval.data=",
        "--set", "eval.zeroshot=", "--set", "data.num_workers=0", "--set", "checkpoint.every=1",
        "--set", "checkpoint.keep_last=0"]


def test_checkpoint_files_load_weights_only_and_a_payload_rank_file_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    common = [*FAST, "--set", f"run_dir={run_dir}"]  # the demo: ZeRO-0, one rank
    launch("stage1_text", *common)
    first, last = complete_checkpoints(run_dir)
    for checkpoint in (first, last):
        for rank_file in checkpoint.glob("rank_*.pt"):
            torch.load(rank_file, weights_only=True)
    assert consolidated_state_dict(last)  # ZeRO-0: DeepSpeed's model-states file, weights-only

    marker = tmp_path / "pwned"
    torch.save({"rng": WritesAFile(marker)}, first / "rank_00000.pt")
    refused = launch("stage1_text", *common, "--resume", first.name, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"{first / 'rank_00000.pt'} holds Python objects besides tensors" in refused.stderr
    assert "Traceback" not in refused.stderr and not marker.exists()
