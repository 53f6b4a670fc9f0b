"""Counting tensor memory on fake tensors: the count follows real allocations, and memory savings show in it."""
import pytest
import torch

import catseg
from catseg import bench
from catseg.aggregation import GuidedSwinBlock, RecomputedMlp
from catseg.memcount import SavedForBackward, TensorBytes, counting


def test_counts_live_storages_once_and_frees_them():
    with TensorBytes() as counter:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500, dtype=torch.bfloat16)  # 1000 bytes
        view = a[10:20].view(2, 5)  # shares a's storage: not counted again
        assert (counter.live, counter.peak) == (5000, 5000)
        del a
        assert counter.live == 5000  # the view keeps the storage alive
        del view
        assert (counter.live, counter.peak) == (1000, 5000)
        counter.reset_peak()
        c = b.float()  # 2000 bytes
        assert (counter.live, counter.peak) == (3000, 3000)
        del b, c
    assert counter.live == 0


def test_moved_bytes_count_inputs_and_outputs_of_every_operator_but_views():
    a = torch.ones(1000)  # 4000 bytes
    row = torch.ones(1, 250)
    with TensorBytes() as counter:
        b = a + a  # reads 2 x 4000, writes 4000
        assert counter.moved == 12000
        v = b.view(4, 250).t()  # views move nothing
        assert counter.moved == 12000
        c = v.t() * row.expand(4, 250)  # the broadcast row is read as its 1000-byte storage
        assert counter.moved == 12000 + 4000 + 1000 + 4000
        assert counter.operators == 2  # the add and the multiply
    assert c.shape == (4, 250)


def _tiny_peaks(fake: bool, precision: str) -> tuple[int, int]:
    torch.manual_seed(0)
    model = catseg.create_model("catseg_tiny", class_chunk_size=4)
    model.check_inputs = False
    cpu = torch.device("cpu")
    with counting(model, fake) as counter:
        inference = bench.bench_inference(model.eval(), cpu, precision, 10, 1, 0, 1, counter=counter)
        training = bench.bench_training(model, cpu, precision, 8, 2, 0, 1, counter=counter)
    return inference["peak_memory_bytes"], training["peak_memory_bytes"]



def test_gathers_and_in_place_scatters_move_only_their_indexed_elements():
    a = torch.ones(1000)  # 4000 bytes
    idx = torch.arange(0, 1000, 100)  # 10 int64 indices: 80 bytes
    with TensorBytes() as counter:
        g = a[idx]  # reads the indices and 10 of a's elements, writes 10
        assert counter.moved == 80 + 40 + 40
        a.index_put_((idx,), g, accumulate=True)  # reads the indices and values, updates 10 elements
        assert counter.moved == 160 + 80 + 40 + 2 * 40
        b = a.index_put((idx,), g)  # out of place: copies all of a
        assert counter.moved > 160 + 200 + 2 * 4000
    assert (a[0], a[1], b[0]) == (2, 1, 1)  # b took the gathered values (ones) back

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fake_count_equals_count_of_the_real_run(precision):
    real = _tiny_peaks(False, precision)
    assert min(real) > 1e6
    fake = _tiny_peaks(True, precision)
    assert fake[0] == real[0]  # inference: the same tensors, byte for byte
    # training: the CPU's fused AdamW kernel keeps a few small tensors more than its shape function says
    assert fake[1] == pytest.approx(real[1], rel=1e-3)
    # the fake run left no fake tensor in the caches: a real run afterwards still computes numbers
    model = catseg.create_model("catseg_tiny").eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 128, 128), ["a", "b"])
    assert torch.isfinite(out).all()


def test_mlp_recompute_keeps_less_for_backward_and_gives_the_same_gradients():
    torch.manual_seed(0)
    block = GuidedSwinBlock(dim=16, guidance_dim=0, num_heads=2, window=4, shift=2, mlp_ratio=4.0)
    x0 = torch.randn(6, 8, 8, 16)
    kept, grads = {}, {}
    for recompute in (False, True):
        block.mlp.recompute = recompute
        block.zero_grad()
        x = x0.clone().requires_grad_()
        with TensorBytes() as counter:
            y = block(x, None)
            kept[recompute] = counter.live - y.untyped_storage().nbytes()
        y.square().sum().backward()
        grads[recompute] = [x.grad] + [p.grad for p in block.parameters()]
    hidden = x0.numel() * 4 * 4  # one (tokens, 4 x 16) float32 hidden activation
    assert kept[False] - kept[True] >= 2 * hidden  # fc1's output and the GELU's output are not kept
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b)
    assert isinstance(block.mlp, RecomputedMlp) and RecomputedMlp.recompute


@pytest.mark.parametrize("act", [torch.nn.GELU, torch.nn.ReLU])
@pytest.mark.parametrize("bf16", [False, True])
def test_mlp_recompute_function_equals_checkpoint_and_plain_mlp(act, bf16):
    """The written-out recompute (autograd Function) gives exactly what torch.utils.checkpoint and the plain Mlp
    give, in fp32 and under bf16 autocast with backward run outside the autocast region (as a trainer does)."""
    torch.manual_seed(0)
    mlp = RecomputedMlp(16, 64, act_layer=act)
    x0 = torch.randn(3, 10, 16)
    assert mlp._plain()
    results = {}
    for path in ("function", "checkpoint", "plain"):
        mlp.zero_grad()
        x = x0.clone().requires_grad_()
        mlp.recompute = path != "plain"
        mlp._plain = (lambda: False) if path == "checkpoint" else RecomputedMlp._plain.__get__(mlp)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = mlp(x)
        (y.float() * torch.linspace(-1, 1, 16)).sum().backward()
        results[path] = [y.detach().float(), x.grad] + [p.grad for p in mlp.parameters()]
        assert all(g.dtype == torch.float32 for g in results[path][1:])
    del mlp.recompute, mlp._plain
    for other in ("checkpoint", "plain"):  # the same operators on the same values: equal, bit for bit
        for a, b in zip(results["function"], results[other]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mlp_recompute_falls_back_to_checkpoint_for_other_mlps():
    assert not RecomputedMlp(8, 16, drop=0.1)._plain()
    assert not RecomputedMlp(8, 16, act_layer=lambda: torch.nn.GELU(approximate="tanh"))._plain()
    assert not RecomputedMlp(8, 16, bias=False)._plain()


@pytest.mark.parametrize("act", [torch.nn.GELU, torch.nn.ReLU])
def test_compiled_mlp_recompute_keeps_no_hidden_layer(act):
    """torch.compile keeps the recompute: the compiled backward gets no (tokens, hidden) tensor from the forward, where
    the compiled Mlp without recompute gets fc1's output; both give the eager gradients."""
    torch.manual_seed(0)
    x0 = torch.randn(3, 10, 16)
    hidden = {}
    for recompute in (True, False):
        torch._dynamo.reset()
        mlp = RecomputedMlp(16, 64, act_layer=act)
        mlp.recompute = recompute
        recorder = SavedForBackward()
        compiled = torch.compile(mlp, backend=recorder)
        grads = []
        for fn in (compiled, mlp):
            mlp.zero_grad()
            x = x0.clone().requires_grad_()
            (fn(x) * torch.linspace(-1, 1, 16)).sum().backward()
            grads.append([x.grad] + [p.grad for p in mlp.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)
        (saved,) = recorder.saved
        hidden[recompute] = [s for s in saved if s[1][-1] == 64]
    assert hidden[True] == [] and hidden[False]
