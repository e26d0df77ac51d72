"""Compile every Triton kernel the library and the engine launch, as their own launchers launch them,
for an H100/H200 (sm_90) on a machine without a GPU.

The CPU test suite runs the kernels through the Triton interpreter, which accepts code the compiler
rejects (and misses what only lowering finds: a layout the backend cannot build, a launch setting
that needs more shared memory than an SM has). Here each public launcher is called with small CPU
tensors while `JITFunction.__getitem__` is replaced by a recorder: instead of launching, it derives
the signature from the arguments (tensor -> pointer of its dtype, int -> i32/i64, float -> fp32) and
the constexprs and launch options the launcher chose, and compiles them with Triton's bundled
ptxas for `GPUTarget("cuda", 90, 32)`, programmatic dependent launch on as on Hopper. Outputs stay
uninitialised; nothing reads them.

Run in a process of its own, without TRITON_INTERPRET (under it @triton.jit builds interpreter
objects that cannot be compiled): `python tests/kernels/hopper_compile.py` prints one JSON line
per compiled kernel variant {"kernel", "ok", "shared", "error"} and exits 0.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory one block may use on an H100/H200
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
         torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "launch_pdl", "num_ctas")
results: list[dict] = []
seen: set = set()


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict) -> None:
    name = f"{fn.fn.__module__}.{fn.fn.__name__}"
    constexprs: dict = {}
    try:
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        params = list(inspect.signature(fn.fn).parameters)
        bound = dict(zip(params, args))
        bound.update(kwargs)
        constexpr_names = {params[i] for i in fn.constexprs}
        keep = {params[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
        constexprs = {n: bound[n] for n in params if n in constexpr_names or bound.get(n) is None}
        signature, attrs = {}, {}
        # Triton's own launch-time specialisation, so the code (and its shared memory) is what a
        # real launch compiles: an int equal to 1 becomes a constant; 16-byte-aligned pointers and
        # ints divisible by 16 are marked so (that lets loads vectorise and loops pipeline).
        for i, n in enumerate(params):
            value = bound[n]
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if n in constexprs:
                signature[n] = "constexpr"
            elif is_int and value == 1 and n not in keep:
                signature[n], constexprs[n] = "constexpr", 1
            else:
                signature[n] = arg_type(value)
                aligned = (value.data_ptr() % 16 == 0 if isinstance(value, torch.Tensor)
                           else is_int and value % 16 == 0 and n not in keep)
                if aligned:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        key = (name, tuple(sorted((k, repr(v)) for k, v in constexprs.items())), tuple(signature.values()),
               tuple(sorted(attrs)), tuple(sorted(options.items())))
        if key in seen:
            return
        seen.add(key)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options)
        shared = int(kernel.metadata.shared)
        ok = shared <= SMEM_LIMIT
        results.append({"kernel": name, "ok": ok, "shared": shared, "constexprs": repr(constexprs)[:200],
                        "error": "" if ok else f"needs {shared} bytes of shared memory, the SM has {SMEM_LIMIT}"})
    except Exception as err:  # a compile error is the finding: report it and go on
        results.append({"kernel": name, "ok": False, "shared": None, "constexprs": repr(constexprs)[:200],
                        "error": f"{type(err).__name__}: {str(err)[-600:]}"})


@contextlib.contextmanager
def recording():
    original = JITFunction.__getitem__

    def getitem(self, grid):
        return lambda *args, **kwargs: compile_launch(self, args, dict(kwargs))

    JITFunction.__getitem__ = getitem
    try:
        yield
    finally:
        JITFunction.__getitem__ = original


def library_launches() -> None:
    """atlas_kernels' public ops, forward and backward, the option combinations that change code."""
    import atlas_kernels  # noqa: F401

    # Imported (and so @triton.jit-decorated) without the interpreter; set now, it only makes
    # _dispatch send CPU tensors to the Triton launchers, which the recorder intercepts.
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        _library_calls()
    finally:
        os.environ.pop("TRITON_INTERPRET", None)


def _library_calls() -> None:
    import atlas_kernels as ak
    from atlas_kernels import fused_linear_grpo_loss, fused_linear_logprobs

    g = torch.Generator().manual_seed(0)
    B, T, V, H = 2, 5, 1000, 64
    for dtype in (torch.bfloat16, torch.float32):
        logits = torch.randn(B, T + 1, V, generator=g).to(dtype).requires_grad_()
        index = torch.randint(0, V, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.bool)
        for entropy in (False, True):
            out = ak.selective_logprobs(logits[:, :-1], index, return_entropy=entropy)
            lp = out[0] if isinstance(out, tuple) else out
            with contextlib.suppress(Exception):
                lp.sum().backward()
        lp_rows = torch.randn(B, T, generator=g).clamp(max=0).requires_grad_()
        old, ref = torch.randn(B, T, generator=g).clamp(max=0), torch.randn(B, T, generator=g).clamp(max=0)
        adv = torch.randn(B, generator=g)
        for level in ("token", "sequence"):
            for loss_type in ("grpo", "dr_grpo", "dapo"):
                loss, _ = ak.grpo_loss(lp_rows, old, ref, adv, mask, beta=0.04, loss_type=loss_type,
                                       importance_sampling_level=level, max_completion_length=T)
                with contextlib.suppress(Exception):
                    loss.backward()
                loss, _ = ak.grpo_loss_from_logits(logits, index, old, ref, adv, mask, beta=0.04, loss_type=loss_type,
                                                   importance_sampling_level=level, max_completion_length=T)
                with contextlib.suppress(Exception):
                    loss.backward()
        hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
        weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
        for entropy in (False, True):
            out = fused_linear_logprobs(hidden, weight, index, return_entropy=entropy)
            lp = out[0] if isinstance(out, tuple) else out
            with contextlib.suppress(Exception):
                lp.sum().backward()
        for level in ("token", "sequence"):
            loss, _ = fused_linear_grpo_loss(hidden, weight, index, old, ref, adv, mask, beta=0.04,
                                             importance_sampling_level=level)
            with contextlib.suppress(Exception):
                loss.backward()
    rewards = torch.randn(16, generator=g).requires_grad_()
    adv = ak.group_advantages(rewards, 4)
    with contextlib.suppress(Exception):
        (adv[0] if isinstance(adv, tuple) else adv).sum().backward()
    a, b = torch.randn(B, T, generator=g).requires_grad_(), torch.randn(B, T, generator=g).requires_grad_()
    with contextlib.suppress(Exception):
        ak.kl_k3(a, b).sum().backward()
    for dtype in (torch.bfloat16, torch.float32):
        for width in (64, 1536, 3584):  # head-dim norms, the hidden sizes (warp count changes)
            x = torch.randn(8, width, generator=g).to(dtype).requires_grad_()
            w = torch.ones(width, dtype=dtype, requires_grad=True)
            with contextlib.suppress(Exception):
                ak.rms_norm(x, w, 1e-6).float().sum().backward()
        gate = torch.randn(4, 96, generator=g).to(dtype).requires_grad_()
        up = torch.randn(4, 96, generator=g).to(dtype).requires_grad_()
        with contextlib.suppress(Exception):
            ak.silu_mul(gate, up).float().sum().backward()
        for heads, kv_heads, d in ((14, 2, 64), (12, 2, 128)):  # the Qwen2.5-0.5B / 1.5B heads
            q = torch.randn(1, 5, heads, d, generator=g).to(dtype).transpose(1, 2).requires_grad_()
            k = torch.randn(1, 5, kv_heads, d, generator=g).to(dtype).transpose(1, 2).requires_grad_()
            cos, sin = torch.randn(1, 5, d, generator=g).to(dtype), torch.randn(1, 5, d, generator=g).to(dtype)
            with contextlib.suppress(Exception):
                qe, ke = ak.rope(q, k, cos, sin)
                (qe.float().sum() + ke.float().sum()).backward()


def engine_launches() -> None:
    """The engine's decode-step kernels at the Qwen2.5-0.5B shape, batch 64, bf16, default settings."""
    from atlas_fast.rollout.engine import decode_kernel, kernels, pdl, sample_kernel, skinny

    pdl._supported = lambda device: True  # launch as on Hopper
    bf = torch.bfloat16
    M, H, HQ, HKV, D, I, S, V = 64, 896, 14, 2, 64, 4864, 768, 151936
    x = torch.randn(M, H).to(bf)
    positions = torch.randint(1, S, (M,))
    cos, sin = torch.randn(S, D).to(bf), torch.randn(S, D).to(bf)
    kc, vc = torch.zeros(M, HKV, S, D, dtype=bf), torch.zeros(M, HKV, S, D, dtype=bf)
    wqkv, bqkv = torch.randn((HQ + 2 * HKV) * D, H).to(bf), torch.randn((HQ + 2 * HKV) * D).to(bf)
    skinny.qkv_rope_store(x, wqkv, bqkv, positions, cos, sin, kc, vc, HQ)
    skinny.qkv_rope_store(x, wqkv, None, positions, cos, sin, kc, vc, HQ,
                          (torch.ones(D, dtype=bf), torch.ones(D, dtype=bf), 1e-6))
    skinny.linear(torch.randn(M, HQ * D).to(bf), torch.randn(H, HQ * D).to(bf))
    act = skinny.gate_up_silu(x, torch.randn(2 * I, H).to(bf))
    parts = skinny.linear(torch.randn(M, I).to(bf), torch.randn(H, I).to(bf), config=skinny.DOWN_CONFIG,
                          split_k=skinny.DOWN_SPLIT)
    w = torch.ones(H, dtype=bf)
    kernels.add_rms_norm(x, None, w, 1e-6)
    kernels.add_rms_norm(x, x.clone(), w, 1e-6)
    kernels.add_rms_norm(x, torch.randn(skinny.DOWN_SPLIT, M, H), w, 1e-6)
    q = torch.randn(M, HQ * D).to(bf)
    k = torch.randn(M, HKV * D).to(bf)
    kernels.rope_store(q, k, k.clone(), positions, cos, sin, kc, vc)
    kernels.silu_mul(torch.randn(M, 2 * I).to(bf))
    qh = torch.randn(M, HQ, D).to(bf)
    for variant in decode_kernel.VARIANTS:
        tickets = torch.zeros(M * HKV, dtype=torch.int32)
        decode_kernel.decode_attention_triton(qh, kc, vc, positions, 0.125, None, variant=variant, tickets=tickets)
        decode_kernel.decode_attention_triton(qh, kc, vc, positions, 0.125, 64, variant=variant, tickets=tickets)
    logits = torch.randn(M, V).to(bf)
    sample_kernel.sample_tokens(logits, 0.9, 7)
    for step in (None, torch.tensor([3, 7])):  # host t and seed; the in-graph sampler's device ones
        sample_kernel.sample_tokens_into(
            logits, 1.0, 7, t=3, finished=torch.zeros(M, dtype=torch.bool), rows=torch.arange(M),
            out_tokens=torch.zeros(M + 1, 8, dtype=torch.long), out_logps=torch.zeros(M + 1, 8),
            stop_mask=torch.zeros(V, dtype=torch.bool), tokens=torch.zeros(M, dtype=torch.long),
            positions=positions.clone(), advance=1, pad_id=0, step=step)
    del act, parts


def main() -> int:
    with recording():
        for launches in (library_launches, engine_launches):
            try:
                launches()
            except Exception as err:  # a launcher that failed before launching is a finding too
                results.append({"kernel": launches.__name__, "ok": False, "shared": None, "constexprs": "",
                                "error": f"launcher raised {type(err).__name__}: {err}"})
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
