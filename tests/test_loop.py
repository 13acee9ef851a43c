"""train_steps against the reference training trajectory (trajectory.pt), resume, DDP and bf16."""

import dataclasses
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import check_trajectory, reference_model_config
from safetensors.torch import load_file, save_file

from dinomaly.config import Config, TrainConfig
from dinomaly.loop import TrainState, seed_everything, train_steps

PARAM_STEPS = (1, 5, 10, 20, 30)


def trajectory_config(**model_overrides):
    """The reference loop of trajectory.pt: 60-step schedule with 5 warm-up steps, batch 4, dropout 0."""
    model = reference_model_config(**{"bottleneck_dropout": 0.0, **model_overrides})
    train = TrainConfig(total_steps=60, warmup_steps=5, batch_size=4, lr=2e-3, final_lr=2e-4, betas=[0.9, 0.999],
                        weight_decay=1e-4, eps=1e-10, clip_grad_norm=0.1, hard_mining_final_p=0.9,
                        hard_mining_ramp_steps=1000, hard_mining_factor=0.1, precision="fp32")
    return Config(model=model, train=train)


def fresh_model(official_state_dict, config):
    from dinomaly.checkpoint import load_official

    return load_official(official_state_dict, config=config.model)


def trainable_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("bottleneck.", "decoder."))}


def run(model, config, batches, start, stop, state=None, snapshots=None):
    """Steps start..stop-1, snapshotting the parameters after each step in PARAM_STEPS."""
    records = []
    edges = [start] + [s for s in PARAM_STEPS if start < s < stop] + [stop]
    for a, b in zip(edges, edges[1:]):
        chunk, state = train_steps(model, batches[a:b], config, state)
        records += chunk
        if snapshots is not None and b in PARAM_STEPS:
            snapshots[b] = trainable_snapshot(model)
    return records, state


@pytest.fixture(scope="module")
def batches(trajectory):
    return [b.float() for b in trajectory["images"]]


@pytest.fixture(scope="module")
def uninterrupted(official_state_dict, batches, tmp_path_factory):
    """30 steps in one process from the official checkpoint; a checkpoint is written after step 10."""
    from dinomaly.checkpoint import save

    config = trajectory_config()
    model = fresh_model(official_state_dict, config)
    snapshots = {}
    records, state = run(model, config, batches, 0, 10, snapshots=snapshots)
    directory = save(tmp_path_factory.mktemp("ckpt") / "step10", model, config, train_state=state.state_dict())
    more, state = run(model, config, batches, 10, 30, state, snapshots)
    return dict(records=records + more, snapshots=snapshots, state=state, checkpoint=directory, model=model)


def test_trajectory_matches_reference_loop(uninterrupted, trajectory):
    model = uninterrupted["model"]
    name_of = {id(p): n for n, p in model.named_parameters()}
    assert [name_of[id(p)] for p in model.trainable_parameters()] == trajectory["meta/param_names"]
    assert len(uninterrupted["records"]) == 30 and uninterrupted["state"].step == 30
    check_trajectory(uninterrupted["records"], uninterrupted["snapshots"], trajectory)


def test_resume_from_checkpoint_continues_bit_for_bit(uninterrupted, batches, trajectory):
    """Interrupt after step 10, reload weights + train state from disk into a new model, run steps 11-30."""
    from dinomaly.checkpoint import load

    ck = load(uninterrupted["checkpoint"])
    torch.manual_seed(12345)  # whatever happened to the RNG meanwhile, the state restores it
    state = TrainState.from_state_dict(ck.model, ck.config, ck.train_state)
    assert state.step == 10 and state.optimizer.param_groups[0]["lr"] == pytest.approx(trajectory["lr"][10], abs=1e-12)
    snapshots = {}
    records, state = run(ck.model, ck.config, batches, 10, 30, state, snapshots)
    check_trajectory(records, snapshots, trajectory, first_step=11)
    assert records == uninterrupted["records"][10:]
    for step in (20, 30):
        for name, value in snapshots[step].items():
            assert torch.equal(value, uninterrupted["snapshots"][step][name]), f"{name} after step {step}"


def test_resume_restores_dropout_rng(official_state_dict, batches, trajectory, tmp_path):
    """With the bottleneck dropout on, a resumed run draws the same masks as an uninterrupted one."""
    from dinomaly.checkpoint import load, save

    config = trajectory_config(bottleneck_dropout=0.2)
    seed_everything(1)
    straight = fresh_model(official_state_dict, config)
    expected, _ = train_steps(straight, batches[:4], config)

    seed_everything(1)
    model = fresh_model(official_state_dict, config)
    first, state = train_steps(model, batches[:2], config)
    save(tmp_path, model, config, train_state=state.state_dict())
    torch.rand(1000)  # consume randomness between the interruption and the resume
    ck = load(tmp_path)
    second, _ = train_steps(ck.model, batches[2:4], ck.config, TrainState.from_state_dict(ck.model, ck.config,
                                                                                           ck.train_state))
    assert first + second == expected
    assert expected[0]["loss"] != pytest.approx(trajectory["loss"][0], abs=1e-4), "dropout must draw from the RNG"


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    seed_everything(7)
    a = draw()
    seed_everything(7)
    assert draw() == a


def test_bf16_autocast_trains_close_to_fp32(official_state_dict, batches, trajectory):
    base = trajectory_config()
    config = dataclasses.replace(base, train=dataclasses.replace(base.train, precision="bf16"))
    records, _ = train_steps(fresh_model(official_state_dict, config), batches[:3], config)
    for rec, ref in zip(records, trajectory["loss"]):
        assert rec["loss"] == pytest.approx(ref, abs=2e-2)
    assert any(rec["loss"] != pytest.approx(ref, abs=1e-6) for rec, ref in zip(records, trajectory["loss"])), \
        "bf16 gave the fp32 losses exactly: autocast is not on"


# --------------------------------------------------------------------------- DDP over 2 processes


def ddp_worker(rank, world, port, out_dir, reference_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from dinomaly.checkpoint import load_official

        trajectory = torch.load(os.path.join(reference_dir, "trajectory.pt"), weights_only=True)
        official = torch.load(os.path.join(reference_dir, "official_checkpoint.pth"), weights_only=True)
        config = trajectory_config()
        model = torch.nn.parallel.DistributedDataParallel(load_official(official, config=config.model))
        half = 4 // world
        batches = [b.float()[rank * half:(rank + 1) * half] for b in trajectory["images"][:5]]
        records, _ = train_steps(model, batches, config)
        out = {f"param/{n}": p.detach() for n, p in model.module.named_parameters()
               if n.startswith(("bottleneck.", "decoder."))}
        for key in ("loss", "grad_norm", "lr", "p"):
            out[key] = torch.tensor([r[key] for r in records], dtype=torch.float64)
        save_file(out, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned gloo worker processes
def test_ddp_two_ranks_with_global_hard_mining_follow_the_single_process_trajectory(reference_dir, trajectory,
                                                                                   tmp_path):
    """Each rank trains on half of every batch; global threshold + DDP mean + global clip = the batch-4 loop."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(2, port, str(tmp_path), str(reference_dir)), nprocs=2, join=True)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    records = [dict(step=i + 1, loss=(ranks[0]["loss"][i] + ranks[1]["loss"][i]).item() / 2,
                    grad_norm=ranks[0]["grad_norm"][i].item(), lr=ranks[0]["lr"][i].item(), p=ranks[0]["p"][i].item())
               for i in range(5)]
    params = {k.split("/", 1)[1]: v for k, v in ranks[0].items() if k.startswith("param/")}
    check_trajectory(records, {5: params}, trajectory)
    for key, value in ranks[1].items():
        if key.startswith("param/") or key == "grad_norm":
            assert torch.equal(value, ranks[0][key]), f"ranks disagree on {key}"
