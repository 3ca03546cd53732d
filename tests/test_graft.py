"""graft-mtp against a loopback Hub: only headers and MTP tensors travel, heads equal our own conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import rel_err, tokens_for
from hubserver import COMMIT, HubServer
from mlxlmkit import CONFIG, conversions, copy_of
from step35_mlx import load_model
from step35_mlx.convert.graft import GRAFT_SHARD, STAGING, graft_mtp, plan_graft
from step35_mlx.convert.quantize import convert_checkpoint
from step35_mlx.convert.remote import RemoteError, RepoFiles
from step35_mlx.safetensors_io import SafetensorsFile
from step35_mlx.generate import ar_tokens
from step35_mlx.sampling import SamplingParams
from step35_mlx.speculative import speculative_tokens

REPO = Path(__file__).resolve().parent.parent
SOURCE = "org/Step-3.5-Flash"


def cli(*args: str, endpoint: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint}
    return subprocess.run([sys.executable, "-m", "step35_mlx", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def mtp_tensor_bytes(hf: Path) -> tuple[int, int]:
    """(bytes of the original's MTP tensors, bytes of the headers of the shards holding them)."""
    n = CONFIG["num_hidden_layers"]
    data = headers = 0
    for f in sorted(hf.glob("*.safetensors")):
        st = SafetensorsFile(f)
        mine = [t for k, t in st.tensors.items() if k.startswith("model.layers.") and int(k.split(".")[2]) >= n]
        if mine:
            data += sum(t.nbytes for t in mine)
            headers += st.header_bytes
    return data, headers


@pytest.fixture(scope="module")
def grafted(tmp_path_factory):
    """(q4 mlx-lm folder with grafted heads, the server's byte count, our own q4 conversion of the original)."""
    root = tmp_path_factory.mktemp("graft")
    folder = copy_of("q4", root / "q4")
    with HubServer(conversions()["hf"], SOURCE) as hub:
        result = graft_mtp(folder, SOURCE, endpoint=hub.endpoint)
    ours = root / "ours-q4"
    convert_checkpoint(conversions()["hf"], ours, recipe="q4", progress=False)
    return folder, hub.log, result, ours


def test_only_headers_and_mtp_tensors_are_transferred(grafted):
    folder, log, result, _ = grafted
    hf = conversions()["hf"]
    data, headers = mtp_tensor_bytes(hf)
    index = (hf / "model.safetensors.index.json").stat().st_size
    assert log.sent == index + headers + data == result.received
    # one whole-file request (the index); everything else ranged, every answer 206
    assert [r for r in log.requests if r[1] is None] == [("model.safetensors.index.json", None, 200)]
    assert all(status == 206 for _, rng, status in log.requests if rng)
    assert len(result.plan.tensors) == 17 * CONFIG["num_nextn_predict_layers"]  # 51, as in the release
    rec = json.loads((folder / "config.json").read_text())["step35_mlx_graft"]
    assert rec["revision"] == COMMIT and rec["mtp_layers"] == 3
    assert not (folder / STAGING).exists()


def test_grafted_heads_equal_our_own_conversion(grafted):
    folder, _, _, ours = grafted
    g = load_model(folder, dtype=mx.float32)
    o = load_model(ours, dtype=mx.float32)
    assert g.num_mtp == 3
    # bit-identical quantized heads
    for j in range(3):
        for name, mod in [("eh_proj", lambda m: m.model.mtp[j].eh_proj),
                          ("head", lambda m: m.model.mtp[j].shared_head.output),
                          ("q_proj", lambda m: m.model.mtp[j].self_attn.q_proj)]:
            for attr in ("weight", "scales", "biases"):
                np.testing.assert_array_equal(np.array(getattr(mod(g), attr)), np.array(getattr(mod(o), attr)))
        np.testing.assert_array_equal(np.array(g.model.mtp[j].enorm.weight), np.array(o.model.mtp[j].enorm.weight))
    tokens = tokens_for(CONFIG["vocab_size"], 20, seed=3)
    hidden = g.forward_hidden(tokens)
    for a, b in zip(g.mtp_logits(tokens, hidden), o.mtp_logits(tokens, hidden)):
        assert rel_err(a, b) == 0.0


def test_greedy_mtp_equals_plain_greedy_on_the_grafted_folder(grafted):
    model = load_model(grafted[0], dtype=mx.float32)
    prompt = tokens_for(CONFIG["vocab_size"], 10, seed=4)[0]
    n = 40
    plain = []
    for t in ar_tokens(model, model.make_cache(), prompt, SamplingParams(temperature=0)):
        plain.append(t)
        if len(plain) == n:
            break
    spec = []
    for t in speculative_tokens(model, model.make_cache(), prompt, SamplingParams(temperature=0), depth=3):
        spec.append(t)
        if len(spec) == n:
            break
    assert spec == plain


def test_mlx_lm_still_loads_the_grafted_folder(grafted):
    from mlx_lm import load as mlx_lm_load

    before, _ = mlx_lm_load(str(conversions()["q4"]))
    after, _ = mlx_lm_load(str(grafted[0]))
    tokens = tokens_for(CONFIG["vocab_size"], 12, seed=5)
    np.testing.assert_array_equal(np.array(before(tokens).astype(mx.float32)), np.array(after(tokens).astype(mx.float32)))


def test_cli_dry_run_then_graft_then_nothing_to_do(tmp_path):
    folder = copy_of("mixed_3_6", tmp_path / "mixed")
    with HubServer(conversions()["hf"], SOURCE) as hub:
        r = cli("graft-mtp", str(folder), "--from", SOURCE, "--dry-run", "--restore", endpoint=hub.endpoint)
        assert r.returncode == 0, r.stderr
        assert f"from {SOURCE}@{COMMIT}" in r.stdout and "read 51 MTP tensors of 3 layers" in r.stdout
        assert "and 20 float routers and norms" in r.stdout  # 3 routers + 17 norms of the 4-layer trunk
        assert not (folder / GRAFT_SHARD).exists()
        r = cli("graft-mtp", str(folder), "--from", SOURCE, "--revision", COMMIT, "--bits", "6", "--quiet",
                endpoint=hub.endpoint)
        assert r.returncode == 0, r.stderr
        assert "grafted 3 MTP layers (51 tensors)" in r.stdout
        r = cli("info", str(folder), endpoint=hub.endpoint)
        assert "3 MTP layers" in r.stdout and "MTP heads grafted from" in r.stdout
        r = cli("graft-mtp", str(folder), "--from", SOURCE, endpoint=hub.endpoint)
        assert r.returncode == 0 and "nothing to do" in r.stdout
    model = load_model(folder, dtype=mx.float32)
    assert model.model.mtp[0].eh_proj.bits == 6


@pytest.mark.parametrize("mode, message", [("ignore-range", "ignored the Range request"), ("416", "HTTP 416")])
def test_server_without_ranges_is_refused(tmp_path, mode, message):
    folder = copy_of("q4", tmp_path / "q4")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    index = (conversions()["hf"] / "model.safetensors.index.json").stat().st_size
    with HubServer(conversions()["hf"], SOURCE, mode=mode) as hub:
        r = cli("graft-mtp", str(folder), "--from", SOURCE, endpoint=hub.endpoint)
        remote = RepoFiles(SOURCE, endpoint=hub.endpoint)
        with pytest.raises(RemoteError, match=message):
            plan_graft(folder, SOURCE, remote=remote)
    assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert remote.received == index  # the refused answer's body was never read
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written


def test_interrupted_graft_resumes_where_it_stopped(tmp_path):
    folder = copy_of("bf16", tmp_path / "bf16")
    hf = conversions()["hf"]
    data, headers = mtp_tensor_bytes(hf)
    index = (hf / "model.safetensors.index.json").stat().st_size
    with HubServer(hf, SOURCE, mode="drop", drop_after=20_000) as hub:
        with pytest.raises(RemoteError, match="interrupted after .* rerun to resume"):
            graft_mtp(folder, SOURCE, endpoint=hub.endpoint)
        first = hub.log.sent
    kept = sum(p.stat().st_size for p in (folder / STAGING).rglob("*") if p.is_file())
    assert kept > 0
    with HubServer(hf, SOURCE) as hub:
        graft_mtp(folder, SOURCE, endpoint=hub.endpoint)
        second = hub.log.sent
    # the second run fetched the metadata again and exactly the tensor bytes not kept
    assert second == index + headers + data - kept
    assert first - (index + headers) >= kept  # kept bytes are bytes the server sent, none invented
    model = load_model(folder, dtype=mx.float32)  # unquantized folder: heads kept bf16 -> float
    assert model.num_mtp == 3 and not hasattr(model.model.mtp[0].eh_proj, "scales")


def test_restore_float_routers_and_norms_gives_our_own_conversion(grafted, tmp_path):
    """--restore on the grafted 4-bit folder: the same model as our q4 conversion of the original, exactly."""
    import shutil

    from step35_mlx.plan import folder_weight_sizes

    folder = tmp_path / "restored"
    shutil.copytree(grafted[0], folder)
    hf = conversions()["hf"]
    n = CONFIG["num_hidden_layers"]
    wanted = {}
    for f in sorted(hf.glob("*.safetensors")):
        st = SafetensorsFile(f)
        mine = [t for k, t in st.tensors.items() if int(k.split(".")[2] if k.startswith("model.layers.") else -1) < n
                and (k.endswith(".moe.gate.weight") or (k.endswith("norm.weight")))]
        if mine:
            wanted[f.name] = (st.header_bytes, sum(t.nbytes for t in mine), len(mine))
    with HubServer(hf, SOURCE) as hub:
        result = graft_mtp(folder, SOURCE, endpoint=hub.endpoint, restore=True)
        sent = hub.log.sent
    index = (hf / "model.safetensors.index.json").stat().st_size
    assert sent == index + sum(h + d for h, d, _ in wanted.values())  # no MTP tensor again, only routers + norms
    assert len(result.plan.restore.tensors) == sum(c for _, _, c in wanted.values())
    restored, ours = load_model(folder, dtype=mx.float32), load_model(grafted[3], dtype=mx.float32)
    assert not hasattr(restored.layers[1].moe.gate, "scales")  # float router
    tokens = tokens_for(CONFIG["vocab_size"], 16, seed=6)
    np.testing.assert_array_equal(np.array(restored(tokens)), np.array(ours(tokens)))
    assert folder_weight_sizes(folder, 4).trunk == folder_weight_sizes(grafted[3], 4).trunk
    from mlx_lm import load as mlx_lm_load  # mlx-lm ignores step35-restore/: its model is unchanged

    before, _ = mlx_lm_load(str(conversions()["q4"]))
    after, _ = mlx_lm_load(str(folder))
    np.testing.assert_array_equal(np.array(before(tokens).astype(mx.float32)), np.array(after(tokens).astype(mx.float32)))


def test_folder_that_is_not_an_mlx_lm_conversion_is_refused(tmp_path):
    r = cli("graft-mtp", str(conversions()["hf"]), endpoint="http://127.0.0.1:9")  # the original: it has its heads
    assert r.returncode == 2 and "is not an mlx-lm conversion" in r.stderr and "Traceback" not in r.stderr
    r = cli("graft-mtp", str(tmp_path / "nowhere"), endpoint="http://127.0.0.1:9")
    assert r.returncode == 2 and r.stderr.startswith("error:")


def test_requests_sessions_of_huggingface_hub_0x_work_the_same(tmp_path):
    """huggingface-hub < 1.0 hands out a requests.Session (>= 1.0: an httpx client); both paths are used."""
    requests = pytest.importorskip("requests")
    folder = copy_of("q4", tmp_path / "q4")
    hf = conversions()["hf"]
    data, headers = mtp_tensor_bytes(hf)
    index = (hf / "model.safetensors.index.json").stat().st_size
    with HubServer(hf, SOURCE) as hub:
        remote = RepoFiles(SOURCE, endpoint=hub.endpoint)
        remote.session = requests.Session()
        plan = plan_graft(folder, SOURCE, remote=remote)
        assert remote.received == index + headers and remote.revision == COMMIT
        t = plan.tensors[0]
        got = bytearray()
        remote.stream_range(t.shard, t.info.begin, t.info.end, got.extend)
        assert bytes(got) == SafetensorsFile(hf / t.shard).read_bytes(t.info)
    with HubServer(hf, SOURCE, mode="ignore-range") as hub:
        remote = RepoFiles(SOURCE, endpoint=hub.endpoint)
        remote.session = requests.Session()
        with pytest.raises(RemoteError, match="ignored the Range request"):
            plan_graft(folder, SOURCE, remote=remote)
