"""Converter data integrity: shard checksums, ``verify --deep``, checked resumes, file-system failures.

User-facing cases run the real CLI as a subprocess (``python -m step35_mlx``). The disk-full
and read-only cases use a real tmpfs (mounted by the test; they need root and Linux and are
skipped elsewhere); the permission case uses ``chmod`` (as root, run without the DAC-override
capability via ``setpriv``, since root ignores permissions).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from step35_mlx.convert.integrity import CHECKSUM_KEY, write_failure
from step35_mlx.convert.quantize import PROGRESS_FILE, convert_checkpoint
from step35_mlx.safetensors_io import ShardWriter, encode_header
from step35_mlx.synthetic import tiny_config, write_hf_checkpoint

REPO = Path(__file__).resolve().parents[1]
KW = dict(recipe="q4", shard_size=100_000, progress=False)


def cli(*args: str, script: str | None = None, prefix: tuple[str, ...] = (), timeout: int = 120
        ) -> subprocess.CompletedProcess:
    """``step35-mlx ARGS`` as a user types it (``script`` runs first in the same process, for test set-up)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_COLOR="1", COLUMNS="200")
    if script is None:
        cmd = [*prefix, sys.executable, "-m", "step35_mlx", *args]
    else:
        runner = f"import runpy, sys\nsys.argv = ['step35-mlx', *{list(args)!r}]\nrunpy.run_module('step35_mlx', run_name='__main__')\n"
        cmd = [sys.executable, "-c", textwrap.dedent(script) + "\n" + runner]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def sha_tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def flip_data_bytes(path: Path, n: int = 4) -> None:
    """Invert ``n`` bytes in the middle of the data section: same size, same (valid) header."""
    raw = bytearray(path.read_bytes())
    (hlen,) = struct.unpack("<Q", raw[:8])
    start = 8 + hlen
    mid = start + (len(raw) - start) // 2
    for i in range(mid, mid + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src")
    write_hf_checkpoint(path, tiny_config(moe_intermediate_size=64, share_expert_dim=64), num_shards=3)
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "q4"
    convert_checkpoint(src, out, **KW)
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size, ro=False) -> Path`` of a fresh tmpfs (unmounted afterwards); skips when not possible."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    mounted = []

    def mount(size: str, ro: bool = False) -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


# ----------------------------------------------------------------------------- checksums


def test_index_records_the_sha256_of_every_shard(reference):
    index = json.loads((reference / "model.safetensors.index.json").read_text())
    sums = index["metadata"][CHECKSUM_KEY]
    assert sorted(sums) == [p.name for p in shards(reference)] and len(sums) >= 3
    for name, digest in sums.items():
        assert hashlib.sha256((reference / name).read_bytes()).hexdigest() == digest


def test_shard_writer_hashes_while_writing_without_rereading(tmp_path):
    """Weight rows first and scales ahead of the hash position (as the converter writes): no re-read."""
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**32, size=(64, 8), dtype=np.uint32)
    sc = rng.standard_normal((64, 2)).astype(np.float16)
    entries = [("a.weight", "U32", (64, 8)), ("a.scales", "F16", (64, 2))]
    header, offsets = encode_header(entries)
    expected = hashlib.sha256(header + w.tobytes() + sc.tobytes()).hexdigest()

    def write(path: Path, **kw) -> ShardWriter:
        writer = ShardWriter(path, header, w.nbytes + sc.nbytes, **kw)
        for r0 in range(0, 64, 16):
            writer.write_at(offsets[0] + r0 * w[0].nbytes, w[r0:r0 + 16])
            writer.write_at(offsets[1] + r0 * sc[0].nbytes, sc[r0:r0 + 16])
        assert writer.commit() == expected
        return writer

    assert write(tmp_path / "x.safetensors").reread_bytes == 0
    assert hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest() == expected
    # With no memory budget for out-of-order bytes, those are read back (the first three scale
    # slices; the last arrives when the hash position has reached it): still the same digest.
    assert write(tmp_path / "y.safetensors", max_pending=0).reread_bytes == 3 * sc.nbytes // 4
    # An overwrite of bytes already hashed falls back to hashing the finished file.
    writer = ShardWriter(tmp_path / "z.safetensors", header, w.nbytes + sc.nbytes)
    writer.write_at(offsets[0], np.zeros_like(w))
    writer.write_at(offsets[0], w)
    writer.write_at(offsets[1], sc)
    assert writer.commit() == expected


# ----------------------------------------------------------------------------- verify --deep


def test_verify_deep_catches_changed_bytes_of_the_same_size(reference, tmp_path):
    out = tmp_path / "q4"
    shutil.copytree(reference, out)
    r = cli("verify", str(out))
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    assert "data: not read" in r.stdout and "--deep" in r.stdout
    r = cli("verify", str(out), "--deep")
    n = len(shards(out))
    assert r.returncode == 0 and f"data: {n} of {n} shard(s) match their recorded sha256" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr

    victim = shards(out)[1]
    size = victim.stat().st_size
    flip_data_bytes(victim)
    assert victim.stat().st_size == size
    # Headers only: the change is invisible to the default check, and the output says data was not read.
    r = cli("verify", str(out))
    assert r.returncode == 0 and "data: not read" in r.stdout, r.stdout
    r = cli("verify", str(out), "--deep")
    assert r.returncode == 1, r.stdout + r.stderr
    problems = [line for line in r.stdout.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and victim.name in problems[0] and "sha256" in problems[0], r.stdout
    assert f"data: {n - 1} of {n} shard(s) match" in r.stdout and "FAILED (1 problem(s))" in r.stdout
    assert "Traceback" not in r.stderr


def test_verify_deep_without_recorded_checksums_warns(reference, tmp_path):
    out = tmp_path / "q4"
    shutil.copytree(reference, out)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["metadata"][CHECKSUM_KEY]
    index_path.write_text(json.dumps(index))
    r = cli("verify", str(out), "--deep")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: no checksums recorded" in r.stdout and "could not check the data" in r.stdout
    assert "shard(s) match" not in r.stdout


# ----------------------------------------------------------------------------- resume re-checks


class Stop(Exception):
    pass


def test_resume_rechecks_finished_shards_and_rewrites_a_changed_one(src, reference, tmp_path):
    out = tmp_path / "out"

    def stop_after_two(event, **info):
        if event == "shard_done" and info["shard"] == 2:
            raise Stop

    with pytest.raises(Stop):
        convert_checkpoint(src, out, hook=stop_after_two, **KW)
    progress = json.loads((out / PROGRESS_FILE).read_text())
    first, second = shards(out)
    assert progress["sha256"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)}
    flip_data_bytes(first)  # same size, same header: only the checksum can tell
    logs: list[str] = []
    res = convert_checkpoint(src, out, log=logs.append, **KW)
    assert res.skipped_shards == 1 and res.written_shards == len(res.plan.shards) - 1
    assert any(first.name in m and "sha256 mismatch" in m and "rewriting" in m for m in logs), logs
    assert any("resuming: 1 of" in m and "checksums re-checked" in m for m in logs), logs
    assert sha_tree(out) == sha_tree(reference)


# ----------------------------------------------------------------------------- file-system failures


FILL_AFTER_FIRST_SHARD = """
import os, sys
FILLED = []
def fill_disk(event, args):
    # Another program fills the disk as soon as the first shard is committed.
    if event == "os.rename" and not FILLED and str(args[1]).endswith("model-00001-of-{n:05d}.safetensors"):
        FILLED.append(1)
        st = os.statvfs({mount!r})
        fd = os.open({ballast!r}, os.O_CREAT | os.O_WRONLY)
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - 16 * 1024)
        os.close(fd)
sys.addaudithook(fill_disk)
"""


def test_disk_full_during_conversion_is_one_line_and_resumes(src, reference, tmpfs):
    mount = tmpfs("80M")  # the converter's up-front check wants the output size + 64 MiB free
    out, ballast = mount / "q4", mount / "ballast"
    n = len(shards(reference))
    args = ("convert", str(src), "--out", str(out), "--recipe", "q4", "--shard-size", "100000", "--quiet")
    r = cli(*args, script=FILL_AFTER_FIRST_SHARD.format(n=n, mount=str(mount), ballast=str(ballast)))
    assert_one_line_error(r, f"the disk holding {out} is full while writing model-00002-of-{n:05d}.safetensors")
    assert "rerun the same command to resume" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([f"model-00001-of-{n:05d}.safetensors", PROGRESS_FILE])
    ballast.unlink()
    r = cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming: 1 of" in r.stdout
    assert sha_tree(out) == sha_tree(reference)


def test_read_only_file_system_is_one_line(src, tmpfs):
    mount = tmpfs("64M", ro=True)
    out = mount / "q4"
    r = cli("convert", str(src), "--out", str(out), "--quiet")
    assert_one_line_error(r, f"{out} is on a read-only file system; choose another --out")
    assert list(mount.iterdir()) == []


def as_unprivileged() -> tuple[str, ...]:
    """A command prefix under which permissions apply: none for a normal user; root without DAC override."""
    if os.geteuid() != 0:
        return ()
    if not shutil.which("setpriv"):
        pytest.skip("root ignores directory permissions and setpriv is not available to drop that")
    caps = "-dac_override,-dac_read_search"
    return ("setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}")


def test_output_folder_not_writable_is_one_line(src, tmp_path):
    prefix = as_unprivileged()
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        r = cli("convert", str(src), "--out", str(parent / "q4"), "--quiet", prefix=prefix)
    finally:
        parent.chmod(0o755)
    assert_one_line_error(r, f"permission denied writing {parent}; choose another --out or make it writable")
    assert list(parent.iterdir()) == []


def test_write_failure_messages_name_the_cause(tmp_path):
    out = tmp_path / "q4"
    assert write_failure(OSError(errno.ENOSPC, "No space left on device"), out, "model-00002-of-00003.safetensors") == (
        f"the disk holding {out} is full while writing model-00002-of-00003.safetensors; free some space and rerun "
        "the same command to resume from the last complete shard")
    assert "read-only file system" in write_failure(OSError(errno.EROFS, "Read-only file system"), out)
    msg = write_failure(PermissionError(errno.EACCES, "Permission denied", str(out / "x.tmp")), out)
    assert msg == f"permission denied writing {out / 'x.tmp'}; choose another --out or make it writable"
    assert write_failure(OSError(errno.EIO, "Input/output error", "f"), out) == (
        f"cannot write the conversion into {out}: Input/output error (f)")


# ----------------------------------------------------------------------------- config types: verify = info = load


@pytest.mark.parametrize("field, value, needle", [
    ("rope_scaling", "llama3", "config field 'rope_scaling' must be a JSON object, got 'llama3'"),
    ("moe_top_k", "2", "config field 'moe_top_k' must be an int, got '2'"),
    ("max_position_embeddings", "4096", "config field 'max_position_embeddings' must be an int, got '4096'"),
    ("layer_types", "sliding_attention", "config field 'layer_types' must be a list of 9 per-layer values"),
])
def test_config_field_of_the_wrong_type_is_refused_alike_by_verify_info_and_load(reference, tmp_path, field, value,
                                                                                   needle):
    from step35_mlx import load_model

    out = tmp_path / "q4"
    shutil.copytree(reference, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg[field] = value
    (out / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("verify", str(out)), f"config.json: {needle}")
    assert_one_line_error(cli("info", str(out)), needle)
    with pytest.raises(ValueError) as e:
        load_model(out)
    assert needle in str(e.value)
