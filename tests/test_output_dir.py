"""The output directory: checked and locked before any work, one run's files at a time, cleaned on failure."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from graphpress import compress
from graphpress.backends import OnnxBackend
from graphpress.fileio import LOCK_NAME, OutputError, claimed_output, clean_up_now

CALIBRATION = [(torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1)),)]


def run(model, out, backends=({"target": "onnx"},), passes=()):
    spec = {"passes": list(passes), "backends": list(backends), "verify": {"max": 10.0}}
    return compress(model, spec, CALIBRATION[0], calibration_data=CALIBRATION, out_dir=out, progress=False)


@pytest.fixture
def no_capture(monkeypatch):
    """Fails the test if a run gets as far as capturing: output problems must be found before any work."""

    def capture(*_args, **_kwargs):
        raise AssertionError("the run captured the model before checking --out")

    monkeypatch.setattr("graphpress.api.capture", capture)


def test_unusable_output_locations_are_refused_before_any_work(tiny_llama, tmp_path, no_capture, monkeypatch):
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        run(tiny_llama, tmp_path / "a_file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="a symlink to .*nowhere, which does not exist"):
        run(tiny_llama, tmp_path / "dangling")
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("graphpress.fileio.os.open", read_only)
    with pytest.raises(OutputError, match="cannot write here: Read-only file system"):
        run(tiny_llama, tmp_path / "ro")
    assert (tmp_path / "a_file").read_text() == "mine"


def test_a_busy_output_directory_is_refused(tiny_llama, tmp_path, no_capture):
    with claimed_output(tmp_path / "out"):
        with pytest.raises(OutputError, match="another graphpress run is writing here"):
            run(tiny_llama, tmp_path / "out")
        assert (tmp_path / "out" / LOCK_NAME).exists()  # the holder's lock file stays: a third run is refused too
        with pytest.raises(OutputError, match="another graphpress run is writing here"):
            run(tiny_llama, tmp_path / "out")
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_a_signal_while_claiming_leaves_nothing(tmp_path, monkeypatch):
    """The claim's clean-up is registered before the directory and lock file exist: a SIGTERM arriving while the
    lock is taken (the CLI's handler cleans up and exits at once) leaves neither."""

    def signalled(_fd, _out):
        clean_up_now()
        raise SystemExit(143)

    monkeypatch.setattr("graphpress.fileio._lock", signalled)
    with pytest.raises(SystemExit), claimed_output(tmp_path / "out"):
        pass
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_a_named_error_and_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    def full(self, graph, inputs, out_dir):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "model.onnx"))

    monkeypatch.setattr(OnnxBackend, "build", full)
    with pytest.raises(
        OutputError, match=r"no space left on the device \(writing .*model.onnx\); nothing was published"
    ):
        run(tiny_llama, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the run created it: it goes again


def test_a_directory_holds_exactly_the_last_runs_files(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    (out / ".staging-killed").mkdir()  # what a SIGKILLed run leaves
    (out / ".staging-killed" / "model.onnx").write_bytes(b"half")
    run(tiny_llama, out)
    assert (out / "model.onnx").exists() and not (out / ".staging-killed").exists()
    run(tiny_llama, out, backends=[{"target": "onnx", "filename": "other.onnx"}])
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert "model.onnx" not in names and "other.onnx" in names and "notes.txt" in names
    assert sorted(manifest) == sorted(set(names) - {"notes.txt", "manifest.json"})
    report = json.loads((out / "report.json").read_text())
    assert [b["artifact"].rsplit("/", 1)[-1] for b in report["backends"]] == ["other.onnx"]


def test_graphpress_report_keeps_the_manifest_true(tiny_llama, tmp_path):
    import hashlib

    from graphpress.cli import main

    out = tmp_path / "out"
    run(tiny_llama, out)
    (out / "report.md").write_text("edited")
    assert main(["report", str(out)]) == 0
    for name, entry in json.loads((out / "manifest.json").read_text())["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"], name


@pytest.mark.parametrize("moment", ["claimed", "staging"])
def test_sigterm_cleans_up_before_exiting(tmp_path, moment):
    """Whenever it lands (loading the model, or writing artifacts), SIGTERM leaves nothing of the run."""
    out = tmp_path / "out"
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "calibration": {"samples": 2, "seq_len": 32},
                "passes": [{"pass": "weight_clustering"}],
                "verify": {"max": 10.0},
            }
        )
    )
    cmd = [sys.executable, "-m", "graphpress", "compress", "--model", "examples/tiny_llama", "--spec", str(spec),
           "--out", str(out), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)

    def reached() -> bool:
        return (out / LOCK_NAME).exists() and (moment == "claimed" or any(out.glob(".staging-*")))

    while proc.poll() is None and not reached():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the moment to interrupt it"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not out.exists()  # it made the directory; it took it away again, lock and staging included


def test_readers_refuse_a_half_published_run(tiny_llama, tmp_path, monkeypatch):
    """Publication moves files one at a time and the manifest last. A run killed between two moves leaves the new
    model.onnx beside the old report: inspect, report and the runtime refuse that mix, naming the manifest,
    and the next run puts a consistent set back."""
    from graphpress import ArtifactMismatchError
    from graphpress.cli import main
    from graphpress.fileio import verify_published
    from graphpress.inspection import inspect_onnx
    from graphpress.report import load_report

    out = tmp_path / "out"
    run(tiny_llama, out)
    before = {name: (out / name).read_bytes() for name in ("model.onnx", "report.json")}
    inspect_onnx(out / "model.onnx")  # a consistent run reads
    load_report(out)

    real_replace, moved = os.replace, []

    def killed_after_first_move(src, dst):
        if Path(dst).parent == out:  # a move into OUT itself (backends first publish into the run's staging)
            if moved:
                raise KeyboardInterrupt  # stands for SIGKILL: nothing after this move happens
            moved.append(Path(dst))
        real_replace(src, dst)

    monkeypatch.setattr("graphpress.fileio.os.replace", killed_after_first_move)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama, out, passes=[{"pass": "low_rank", "targets": "layers.0.mlp.*", "rank": 8}])
    monkeypatch.setattr("graphpress.fileio.os.replace", real_replace)
    assert [p.name for p in moved] == ["model.onnx"] and (out / "model.onnx").read_bytes() != before["model.onnx"]
    assert (out / "report.json").read_bytes() == before["report.json"]  # the old report describes another model

    with pytest.raises(ArtifactMismatchError, match=r"model\.onnx: not the file .*manifest\.json lists"):
        inspect_onnx(out / "model.onnx")
    with pytest.raises(ArtifactMismatchError, match="model.onnx"):
        verify_published(out / "model.onnx")
    assert main(["inspect", str(out / "model.onnx")]) == 2
    (out / "report.json").write_text((out / "report.json").read_text().replace('"model"', '"model" ', 1))
    with pytest.raises(ArtifactMismatchError, match=r"report\.json"):
        load_report(out)

    run(tiny_llama, out)  # the next run publishes a whole set again
    inspect_onnx(out / "model.onnx")
    load_report(out)


def test_runtime_loaders_check_the_manifest(tmp_path):
    """OnnxDecoder, TvmModule and cuda.load verify a file against the manifest beside it before loading it."""
    from graphpress import ArtifactMismatchError
    from graphpress.backends import cuda
    from graphpress.fileio import write_manifest
    from graphpress.runtime import OnnxDecoder, TvmModule

    out, stage = tmp_path / "out", tmp_path / "stage"
    stage.mkdir()
    for name in ("model.onnx", "model.so", "model.so.json", "model.pt2"):
        (stage / name).write_bytes(b"published")
    write_manifest(out, stage, [out / n for n in ("model.onnx", "model.so", "model.so.json", "model.pt2")])
    out.mkdir()
    os.replace(stage / "manifest.json", out / "manifest.json")
    for name in ("model.onnx", "model.so", "model.so.json", "model.pt2"):
        (out / name).write_bytes(b"replaced!")  # same size, other bytes
    for load, name in [(OnnxDecoder, "model.onnx"), (TvmModule, "model.so"), (cuda.load, "model.pt2")]:
        with pytest.raises(ArtifactMismatchError, match=name):
            load(out / name)
