"""ZeRO-3 inside 2 fake nodes x 2 gloo ranks, cross-node exact or PowerSGD averaging (DeepSpeed for real).

One launch of 4 processes (DeepSpeed start-up dominates) compares flat ZeRO-3 over 4 ranks
with the hierarchical exact scheme, then trains with PowerSGD (bytes, replicas, resume).
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.multirank import run_ranks

VOCAB, D, SEQ, MICRO = 64, 32, 16, 4


class TinyLM(nn.Module):
    """Embeddings + 2 MLP resblocks + unembedding; learns a fixed token permutation."""

    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, D)
        self.pos_emb = nn.Parameter(0.02 * torch.randn(SEQ, D))
        self.blocks = nn.ModuleList(nn.ModuleDict({"ln": nn.LayerNorm(D), "fc1": nn.Linear(D, 4 * D),
                                                   "fc2": nn.Linear(4 * D, D)}) for _ in range(2))
        self.ln_f = nn.LayerNorm(D)
        self.to_logits = nn.Linear(D, VOCAB)

    def forward(self, x):  # x: (B, T)
        h = self.tok_emb(x) + self.pos_emb  # (B, T, D)
        for b in self.blocks:
            h = h + b["fc2"](F.gelu(b["fc1"](b["ln"](h))))
        logits = self.to_logits(self.ln_f(h))  # (B, T, V)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))


def batch(step, micro, rank):
    g = torch.Generator().manual_seed(100_000 * step + 100 * micro + rank)
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    x = torch.empty(MICRO, SEQ, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (MICRO,), generator=g)
    for t in range(1, SEQ):
        x[:, t] = perm[x[:, t - 1]]
    return x


def build(mode, node_size=2, rank=8, gas=2, bucket=1500, lr=3e-3):
    """mode: flat | exact | powersgd. Returns (engine, hierarchy or None)."""
    import deepspeed

    from dalle_ds.parallel import hierarchy as hierarchical_zero
    from dalle_ds.config import PowerSGDConfig, replace

    hier, init_kwargs = None, {}
    if mode != "flat":
        cfg = replace(PowerSGDConfig(), enabled=mode == "powersgd", hierarchical=True, node_size=node_size,
                      rank=rank, min_compression_numel=256, comm_dtype="float16")
        hier = hierarchical_zero.setup(cfg, seed=3)
        init_kwargs = hier.zero_init_kwargs()
    torch.manual_seed(0)
    ds_config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
                 "gradient_clipping": 1.0, "steps_per_print": 10**9,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                       "reduce_bucket_size": bucket, "stage3_prefetch_bucket_size": bucket}}
    with deepspeed.zero.Init(config_dict_or_path=ds_config, **init_kwargs):
        model = TinyLM()
    if hier is not None:
        hierarchical_zero.mark_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    if hier is not None:
        hier.attach(engine)
    return engine, hier


def train(engine, steps, start=0, gas=2):
    rank = torch.distributed.get_rank()
    losses, norms = [], []
    for step in range(start, start + steps):
        for micro in range(gas):
            loss = engine(batch(step, micro, rank))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms


def full_params(engine):
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().reshape(-1).clone() for p in params]).numpy()  # by value through the queue


def expected_cross_bytes(model, node_size, local, rank, min_numel, exact_fn):
    """(payload bytes one rank all-reduces across nodes per step, 16-bit factors), from the parameter
    shapes alone (without the step's flag and the factors' fp32 scale scalars)."""
    total = blocks = 0
    for name, p in model.named_parameters():
        shape = tuple(p.ds_shape)
        numel = math.prod(shape)
        part = math.ceil(numel / node_size)
        off = part * local
        valid = min(part, numel - off)
        if valid <= 0:
            continue
        if exact_fn(name, p) or len(shape) < 2:
            total += 4 * valid
            continue
        cols = math.prod(shape[1:])
        head = min((-off) % cols, valid)
        rows = (valid - head) // cols
        r = min(rank, rows, cols)
        if rows < 1 or rows * cols < min_numel:
            total += 4 * valid
        elif r * (rows + cols) * 2 < rows * cols * 2:  # pays vs fp16 exact
            total += 2 * r * (rows + cols) + 4 * (valid - rows * cols)  # fp16 P, Q + fp32 head/tail
            blocks += 2  # one fp32 max-abs scalar for P, one for Q'
        else:  # exact in 16 bit (+ fp32 head/tail)
            total += 2 * rows * cols + 4 * (valid - rows * cols)
            blocks += 1
    return total, blocks


def _all_modes(ckpt_dir):
    from dalle_ds.parallel import hierarchy as hierarchical_zero
    from dalle_ds.parallel import powersgd
    from dalle_ds.parallel.dist import init_distributed

    info = init_distributed()
    out = {}
    for mode in ("flat", "exact"):
        engine, hier = build(mode)
        out[mode] = train(engine, 4)
        if hier is not None:
            out["stats"] = hier.stats()
            out["partition"] = next(engine.module.parameters()).ds_process_group.size()
        out[mode + "_params"] = full_params(engine)

    # PowerSGD: measured bytes = every cross-node collective the averager issues in one step
    calls = []
    real_all_reduce = powersgd._all_reduce

    def counting(t, group, num_nodes, op=torch.distributed.ReduceOp.SUM):
        calls.append((t.numel() * t.element_size(), t.dtype))
        real_all_reduce(t, group, num_nodes, op=op)

    powersgd._all_reduce = counting
    engine, hier = build("powersgd")
    train(engine, 1)
    powersgd._all_reduce = real_all_reduce
    out["measured_bytes"] = sum(b for b, _ in calls)
    out["factor_calls"] = sum(1 for _, dt in calls if dt == torch.float16)
    out["expected_bytes"], out["blocks"] = expected_cross_bytes(engine.module, 2, info.local_rank, 8, 256,
                                                                hierarchical_zero.default_exact)
    out["psgd_stats"] = hier.stats()
    train(engine, 5, start=1)
    out["psgd_params"] = full_params(engine)
    out["final_stats"] = hier.stats()

    # checkpoint/resume with PowerSGD state (fresh model, optimizer and averager on resume)
    engine, hier = build("powersgd")
    train(engine, 3)
    engine.save_checkpoint(ckpt_dir, tag="s3")
    torch.save(hier.state_dict(), os.path.join(ckpt_dir, f"powersgd-rank{info.rank}.pt"))
    out["uninterrupted"], _ = train(engine, 3, start=3)
    engine, hier = build("powersgd")
    engine.load_checkpoint(ckpt_dir, tag="s3")
    hier.load_state_dict(torch.load(os.path.join(ckpt_dir, f"powersgd-rank{info.rank}.pt")))
    out["resumed"], _ = train(engine, 3, start=3)
    engine, hier = build("powersgd")
    engine.load_checkpoint(ckpt_dir, tag="s3")  # without the error buffers: must differ
    out["resumed_no_state"], _ = train(engine, 3, start=3)
    return out


def test_two_fake_nodes_exact_and_powersgd(tmp_path):
    out = run_ranks(_all_modes, 4, args=(str(tmp_path),), node_size=2, timeout_s=300)
    for r, o in enumerate(out):
        # compression off: hierarchical (ZeRO-3 in node + fp32 all-reduce across) == flat ZeRO-3 over 4
        assert o["partition"] == 2  # parameters really sharded within the node only
        for key in (0, 1):  # losses, then gradient norms
            flat, exact = torch.tensor(o["flat"][key]), torch.tensor(o["exact"][key])
            torch.testing.assert_close(exact, flat, rtol=1e-6, atol=0), (r, key)
        torch.testing.assert_close(torch.from_numpy(o["exact_params"]), torch.from_numpy(o["flat_params"]),
                                   rtol=1e-6, atol=1e-7)
        assert o["stats"]["steps"] == 4 and o["stats"]["compression_rate"] == 0.0
        # PowerSGD: measured cross-node payload = formula from the shapes + one fp32 flag per step
        # + one fp32 max-abs scalar per 16-bit factor (P and Q' of a compressed block, or a 16-bit exact block)
        assert o["factor_calls"] >= 4, o["factor_calls"]  # several buckets exercised (P and Q' each)
        assert o["measured_bytes"] == o["expected_bytes"] + 4 + 4 * o["blocks"], (r, o["measured_bytes"])
        assert o["psgd_stats"]["cross_node_bytes_per_step"] == o["measured_bytes"]
        assert 0.3 < o["psgd_stats"]["compression_rate"] < 1.0, o["psgd_stats"]
        assert o["final_stats"]["steps"] == 6 and o["final_stats"]["skipped_nonfinite"] == 0
        # checkpoint + resume with the PowerSGD state reproduces the next losses
        torch.testing.assert_close(torch.tensor(o["resumed"]), torch.tensor(o["uninterrupted"]), rtol=1e-6, atol=0)
        assert o["resumed_no_state"] != o["uninterrupted"]  # the error buffers matter
    assert out[0]["flat"][0] != out[1]["flat"][0]  # ranks saw different data
    # the nodes stay replicas: identical parameters on the ranks with the same local index
    assert (out[0]["psgd_params"] == out[2]["psgd_params"]).all()
    assert (out[1]["psgd_params"] == out[3]["psgd_params"]).all()
    assert not (out[0]["psgd_params"] == out[0]["exact_params"]).all()  # compression did change the run
