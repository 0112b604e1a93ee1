"""Every training command under torchrun with two processes on the CPU (gloo), a few tiny steps, as a
user launches it on a multi-GPU machine:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m training.train_X --tiny ...

MC_DIST_CHECK makes each rank write what it ended with (training/distributed.py): the sha256 of its
trained parameters after the last optimiser step, the sha256 of its first batch, the logits shapes of
its contrastive losses and the files it wrote. Both ranks must end with the same weights from
different data (DDP averaged the gradients), the contrastive logits must span the batch gathered from
both processes, and only rank 0 writes."""
import json
import os
import subprocess
import sys

import pytest

import comfy_harness

# module, extra arguments, files rank 0 writes, contrastive losses (name in the check file)
TRAINERS = {
    "vae": ("training.train_vae", ["--steps", "2"], ["vae.safetensors", "vae.json"], []),
    "clip": ("training.train_clip", [], ["clip.safetensors", "clip.json"], ["clip"]),
    # the GPU recipe: a pre-rendered scene set (each process encodes and draws from its shard)
    "unet": ("training.train_unet", ["--train-text-encoder", "--sample-prompts", "0", "--dataset", "SCENES"],
             ["unet.safetensors", "text_encoder.safetensors", "unet.json"], []),
    "noise_aware": ("training.train_noise_aware", [], ["noise_aware.safetensors", "noise_aware.json"], ["noise_aware"]),
    "composer": ("training.train_composer", ["--base", "random"], ["composer.safetensors", "composer.json"], ["icm", "nicm"]),
}


def launch(module: str, out, *extra, processes: int = 2, script=None):
    env = dict(os.environ, MC_COMFYUI=str(comfy_harness.COMFY_DIR), MC_DIST_CHECK=str(out / "check"),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           *([str(script)] if script else ["-m", module]), "--tiny", "--out", str(out), "--threads", "1", *extra]
    proc = subprocess.run(cmd, cwd=comfy_harness.PACK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ranks = [json.loads((out / "check" / f"rank{r}.json").read_text()) for r in range(processes)]
    return proc.stdout, ranks


SCENE_SET_SIZE = 11  # odd: the sampler pads one shard with a repeated scene


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    cmd = [sys.executable, "-m", "training.make_dataset", "--n", str(SCENE_SET_SIZE), "--workers", "1", "--out", str(folder)]
    proc = subprocess.run(cmd, cwd=comfy_harness.PACK_DIR, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return folder


@pytest.mark.parametrize("name", list(TRAINERS))
def test_two_processes_end_with_the_same_weights(name, tmp_path, request):
    module, extra, written, contrastive = TRAINERS[name]
    if "SCENES" in extra:
        extra = [str(request.getfixturevalue("scene_set")) if a == "SCENES" else a for a in extra]
    out = tmp_path / "out"
    stdout, (rank0, rank1) = launch(module, out, *extra)
    if "--dataset" in extra:  # DistributedSampler: disjoint shards (up to its padding) that cover the set
        shards = set(rank0["shard"]), set(rank1["shard"])
        assert len(rank0["shard"]) == len(rank1["shard"]) == (SCENE_SET_SIZE + 1) // 2
        assert shards[0] | shards[1] == set(range(SCENE_SET_SIZE)) and len(shards[0] & shards[1]) <= 1
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["steps"] == rank1["steps"] >= 2
    # the data is split (each rank drew its own batch), the weights are one (DDP averaged the gradients)
    assert rank0["first_batch_sha256"] != rank1["first_batch_sha256"]
    assert rank0["parameters_sha256"] == rank1["parameters_sha256"]
    # contrastive losses over the batch gathered from both processes: N x N logits, N = 2 x the per-rank batch
    gathered = 2 * rank0["batch_per_process"]
    for rank in (rank0, rank1):
        assert rank["logits"] == {loss: [gathered, gathered] for loss in contrastive}
    # rank 0 alone writes, each file once (no periodic save in a tiny run), and prints
    assert rank1["writes"] == []
    assert sorted(os.path.basename(p) for p in rank0["writes"]) == sorted(written)
    assert stdout.count(f"[{name}] step 1/") == 1 and stdout.count(f"[{name}] done") == 1
    record = json.loads((out / written[-1]).read_text())
    assert record["processes"] == 2 and record["global_batch"] == gathered


# train_vae with rank 1's clock running twice as fast as rank 0's (a slower or busier machine), and a
# short collective timeout so that ranks left waiting fail in seconds, not gloo's 30 minutes
SKEWED_CLOCK = """
import datetime, os, sys, time, types
sys.path.insert(0, {pack!r})
import torch.distributed as dist
from training import common, train_vae
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
if os.environ["RANK"] == "1":
    t0 = time.time()
    common.time = types.SimpleNamespace(time=lambda: t0 + 2 * (time.time() - t0))
train_vae.main(sys.argv[1:])
"""


def test_a_minutes_budget_stops_every_process_at_the_same_step(tmp_path):
    """--minutes: rank 0's clock decides each step (broadcast), even where the ranks' clocks disagree;
    without it the ranks stop at different steps and the one still training waits for the others."""
    out = tmp_path / "out"
    script = tmp_path / "skewed_clock.py"
    script.write_text(SKEWED_CLOCK.format(pack=str(comfy_harness.PACK_DIR)))
    stdout, (rank0, rank1) = launch("training.train_vae", out, "--steps", "99999", "--minutes", "0.15", script=script)
    assert 1 <= rank0["steps"] == rank1["steps"] < 99999
    assert rank0["parameters_sha256"] == rank1["parameters_sha256"]
    assert json.loads((out / "vae.json").read_text())["steps"] == rank0["steps"]


# Two processes with 4 rows each against one process with all 8: the contrastive loss over the
# gathered rows and DDP's averaged gradient must be the one-process loss and gradient of the whole batch
# (torch.distributed.nn's all_gather sends each process's rows their gradient from every process's
# loss; DDP divides by the number of processes).
GATHERED_GRADIENT = """
import json, os, sys
sys.path.insert(0, {pack!r})
import torch
import torch.nn.functional as F
from training import distributed

ctx = distributed.init()
torch.manual_seed(0)
model, reference = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
reference.load_state_dict(model.state_dict())
x, y = torch.randn(8, 6), torch.randn(8, 4)


def loss_of(a, b):  # sdg.contrastive_loss / cdd_icm.icm_loss: symmetric cross-entropy, positives on the diagonal
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / 0.1
    labels = torch.arange(len(a))
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)


ddp = distributed.wrap(model)
rows = slice(4 * ctx.rank, 4 * ctx.rank + 4)
loss = loss_of(distributed.gather(ddp(x[rows])), distributed.gather(y[rows]))
loss.backward()
reference_loss = loss_of(reference(x), y)
reference_loss.backward()
out = {{"loss": loss.item(), "reference_loss": reference_loss.item(),
        "grad_difference": max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), reference.parameters())),
        "grad_scale": max(q.grad.abs().max().item() for q in reference.parameters())}}
open(os.path.join({out!r}, f"rank{{ctx.rank}}.json"), "w").write(json.dumps(out))
distributed.finish()
"""


def test_gathered_contrastive_loss_is_the_whole_batch_loss(tmp_path):
    script = tmp_path / "gathered_gradient.py"
    script.write_text(GATHERED_GRADIENT.format(pack=str(comfy_harness.PACK_DIR), out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, cwd=comfy_harness.PACK_DIR, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
        assert result["grad_difference"] <= 1e-5 * result["grad_scale"], result
