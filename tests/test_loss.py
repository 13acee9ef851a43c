"""Hard-mining global cosine loss: reference value and gradients, the strictly-below rule, global batches."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from dinomaly.loss import hard_mining_cosine_loss, hard_mining_p


def close(got, ref, atol=0.0, rel_max=0.0, rtol=0.0):
    """The reference README's element-wise bound: |got - ref| <= atol + rel_max * max|ref| + rtol * |ref|."""
    ref = torch.as_tensor(ref, dtype=torch.float32)
    got = torch.as_tensor(got, dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol + rel_max * ref.abs().max().item())


def trainable_named(model):
    return {n: p for n, p in model.named_parameters() if n.startswith(("bottleneck.", "decoder."))}


def loss_and_grads(model, images, p):
    for param in model.trainable_parameters():
        param.grad = None
    enc, dec = model(images)
    loss = hard_mining_cosine_loss(enc, dec, p, factor=0.1)
    loss.backward()
    grads = {n: q.grad.detach().clone() for n, q in trainable_named(model).items()}
    for param in model.trainable_parameters():
        param.grad = None
    return loss.item(), grads


def test_hard_mining_p_matches_reference_ramp(vectors):
    got = [hard_mining_p(it, 0.9, 1000) for it in vectors["sched/iters"]]
    close(got, vectors["sched/p"], atol=1e-9)
    assert hard_mining_p(0) == 0.0 and hard_mining_p(5000) == 0.9


@pytest.mark.parametrize("p", ["0.9", "0.0"])
def test_loss_value_and_all_gradients_match_reference(reference_model, vectors, p):
    value, grads = loss_and_grads(reference_model, vectors["fwd84/images"], float(p))
    close(value, vectors[f"loss/p{p}/value"], atol=1e-6)
    names = [k.split("/grad/", 1)[1] for k in vectors if k.startswith(f"loss/p{p}/grad/")]
    assert len(names) == 100 and sorted(names) == sorted(grads)
    for name in names:
        close(grads[name], vectors[f"loss/p{p}/grad/{name}"], rel_max=1e-5, rtol=1e-5)


def test_batch_of_five_uses_float_one_minus_p(reference_model, vectors):
    """180 points at p = 0.9 keep int(180 * (1 - 0.9)) = 17 hardest points, not 18."""
    images = torch.cat([vectors["fwd84/images"], vectors["e2e/images_b"][:2]])
    value, grads = loss_and_grads(reference_model, images, 0.9)
    close(value, vectors["loss/b5_p0.9/value"], atol=1e-6)
    for name in ("bottleneck.0.fc1.weight", "bottleneck.0.fc1.bias", "bottleneck.0.fc2.weight", "bottleneck.0.fc2.bias"):
        close(grads[name], vectors[f"loss/b5_p0.9/grad/{name}"], rel_max=1e-5, rtol=1e-5)
    norms = [grads[n].norm().item() for n in vectors["loss/b5_p0.9/grad_norm_names"]]
    close(norms, vectors["loss/b5_p0.9/grad_norms"], rel_max=1e-5, rtol=1e-5)


def test_easy_points_strictly_below_threshold_get_damped():
    """4 points, p = 0.5: k = 2, distances 1.29 > 0.615 = 0.615 > 0.001: the tie at the threshold keeps full gradient."""
    enc = torch.tensor([[[[1.0, 1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]]])  # [1, 2, 1, 4]
    dec = torch.tensor([[[[-0.3, 0.5, 0.5, 2.0]], [[1.0, 1.2, 1.2, 0.1]]]], requires_grad=True)
    hard_mining_cosine_loss([enc], [dec], 0.0).backward()
    full = dec.grad.clone()
    dec.grad = None
    loss = hard_mining_cosine_loss([enc], [dec], 0.5, factor=0.1)
    loss.backward()
    ratio = dec.grad / full
    torch.testing.assert_close(ratio[0, :, 0], torch.tensor([[1.0, 1.0, 1.0, 0.1]] * 2))
    close(loss.item(), 1 - torch.nn.functional.cosine_similarity(enc.flatten(1), dec.detach().flatten(1)).item(),
          atol=1e-7)


def test_p_that_keeps_no_point_is_an_error():
    enc, dec = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="hard_mining_final_p"):
        hard_mining_cosine_loss([enc], [dec], 0.9)


# --------------------------------------------------------------------------- global batch over 2 processes


def synthetic_groups(batch=6):
    """Two groups whose second half of the batch reconstructs worse, so local and global thresholds differ."""
    gen = torch.Generator().manual_seed(3)
    enc = [torch.randn(batch, 8, 5, 5, generator=gen) for _ in range(2)]
    noise = torch.linspace(0.2, 2.0, batch).view(batch, 1, 1, 1)
    dec = [e + noise * torch.randn(e.shape, generator=gen) for e in enc]
    return enc, dec


def global_batch_worker(rank, world, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        enc, dec = synthetic_groups()
        half = enc[0].shape[0] // world
        rows = slice(rank * half, (rank + 1) * half)
        out = {}
        for mode in ("global", "local"):
            leaves = [d[rows].clone().requires_grad_() for d in dec]
            loss = hard_mining_cosine_loss([e[rows] for e in enc], leaves, 0.7, global_batch=mode == "global")
            loss.backward()
            out[f"{mode}/loss"] = loss.detach().reshape(1)
            for i, leaf in enumerate(leaves):
                out[f"{mode}/grad{i}"] = leaf.grad
        save_file(out, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_batch_threshold_over_two_ranks_equals_one_process(tmp_path):
    """Each rank holds half the batch; gradients / world (what DDP averages) equal the whole-batch ones."""
    mp.spawn(global_batch_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]

    enc, dec = synthetic_groups()
    leaves = [d.clone().requires_grad_() for d in dec]
    loss = hard_mining_cosine_loss(enc, leaves, 0.7)
    loss.backward()
    half = enc[0].shape[0] // 2
    torch.testing.assert_close((ranks[0]["global/loss"] + ranks[1]["global/loss"]) / 2, loss.detach().reshape(1))
    for i, leaf in enumerate(leaves):
        for r in range(2):
            torch.testing.assert_close(ranks[r][f"global/grad{i}"] / 2, leaf.grad[r * half:(r + 1) * half],
                                       rtol=1e-5, atol=1e-8)
    # per-rank thresholds damp other points: the test would notice a global_batch that does nothing
    local = torch.cat([ranks[0]["local/grad0"], ranks[1]["local/grad0"]]) / 2
    assert not torch.allclose(local, leaves[0].grad, rtol=1e-3, atol=0)
