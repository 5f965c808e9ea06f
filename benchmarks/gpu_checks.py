"""The GPU checks a lent GPU runs first (``benchmarks/gpu.sh`` stage 2): what the CPU interpreter cannot prove.

Each check runs in its own process on a GPU (a CUDA error poisons its context; a hang costs only
its own time limit) and prints one line: ``PASS|FAIL|SKIP <name>: <figure>``. The script goes on whatever a
check says; the whole stage keeps to ``--budget-s`` (120 s in gpu.sh), checks that would start
past it print SKIP.

- ``float32_gemm_out``: ``torch.mm``/``torch.addmm`` with 16-bit operands and ``out_dtype=float32``
  (the chunked path's logits and grad_weight GEMMs; ``addmm`` also with ``beta=0`` and an ``alpha``) on this image's torch, bf16 and fp16, against
  float64; and what dpo-fast's own probe (``float32_gemm_out``, in ``dpo_fast.gemm`` or ``planner``)
  decided. FAIL when the library would call a GEMM that refuses or rounds to 16 bits.
- ``row_offsets_2_31``: the row kernels (``token_logps_from_logits``, impl="chunked", forward and
  backward) on bf16 logits [16385, 131072]: the last row starts at element 2^31. Log-probs and
  gradients of rows on both sides of 2^31 against float64.
- ``float32_tf32``: a float32 head on impl="chunked" and "fused", with TF32 off and on
  (``torch.set_float32_matmul_precision``): token log-probs and grad_hidden against float64, as a
  multiple of naive IEEE float32's error (float32 accuracy: at most ``FLOAT32_FACTOR`` times it).
- ``autotune_bit_identical``: the fused kernels (forward, grad_hidden, grad_weight; bf16) at a
  new shape: the first call autotunes, the second reuses the choice; every output bit-identical.
- ``split_sizing_occupancy``: the programs per SM the fused forward and grad_hidden launchers size their
  vocabulary splits from (``kernels/occupancy.py`` on the compiled kernel they launch; bf16 and float32)
  against the driver's own count (``cuOccupancyMaxActiveBlocksPerMultiprocessor`` on the same kernels).
  FAIL on a difference, or where the launcher fell back to its fixed counts.
- ``kept_gradient_route``: one bf16 pair split with its gradient kept (``planner.Chunk.keep_gradient``: its
  GEMMs scaled by a host ``alpha``, grad_weight written in bf16 by one GEMM) against the same call on the
  one-chunk route, sigmoid (one scale) and orpo (two scales, a float32 sum): loss, log-probs, grad_hidden
  and grad_weight (the route forced: the planner's choice of it is priced and tested on CPU).
- ``non_current_device``: with two GPUs, a head on cuda:1 while cuda:0 is current (impl chunked and
  fused, forward and backward) against the same call on cuda:0; cuda:0 stays current.
- ``stream_overlap``: a measurement for issue 19's open item (the row passes hidden behind the next
  chunk's GEMMs on a second stream): the statistics pass over a float32 [2048, 128256] logits tile and
  the next tile's logits GEMM (bf16, H 4096), each alone and both at once on two streams (CUDA events,
  medians). PASS with the times and the share of the shorter one hidden; the cost model assumes none
  until this says how much.

``--dry-run`` runs every check on CPU (Triton's interpreter) at tiny shapes, all in one process, to
prove the script; its figures mean nothing about a GPU. Usage: ``python -m benchmarks.gpu_checks [--dry-run]
[--budget-s 120] [--only NAME]``.
"""

import argparse
import os
import subprocess
import sys
import time

# float32 accuracy means within this factor of naive IEEE float32 (the suites' confident-token rule: 3x,
# plus room for a different summation order on the GPU). TF32 on: whether the library must keep float32
# accuracy is the precision policy's call (README, "GPU notes"); this check holds it to float32 accuracy.
FLOAT32_FACTOR = 4.0
PER_CHECK_S = {"float32_gemm_out": 30, "row_offsets_2_31": 50, "float32_tf32": 60, "autotune_bit_identical": 60,
               "split_sizing_occupancy": 45, "kept_gradient_route": 30, "non_current_device": 45,
               "stream_overlap": 30}


def _rel(actual, expected) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def _device(dry_run):
    import torch

    return torch.device("cpu" if dry_run else "cuda")


# ----------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------

def _library_gemm_verdict(device, dtype):
    """dpo-fast's own decision (``float32_gemm_out`` in ``dpo_fast.gemm`` or ``dpo_fast.planner``), whichever
    form it takes: by device type (``"cuda"``) or by device, with the operands' dtype where it asks for one.
    Returns (decision or None, how it was asked)."""
    import importlib
    import inspect

    for module_name in ("dpo_fast.gemm", "dpo_fast.planner"):
        try:
            probe = getattr(importlib.import_module(module_name), "float32_gemm_out", None)
        except ImportError:
            probe = None
        if probe is not None:
            break
    else:
        return None, "no float32_gemm_out in dpo_fast.gemm or dpo_fast.planner"
    where = f"{probe.__module__}.float32_gemm_out"
    params = list(inspect.signature(probe).parameters.values())
    if not params:
        return None, f"{where} takes no device"
    args = [device.type if "type" in params[0].name else device]
    if len(params) > 1 and params[1].default is inspect.Parameter.empty:
        args.append(dtype)
    try:
        return bool(probe(*args)), f"{where}({', '.join(map(str, args))})"
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        return None, f"{where} raised {type(exc).__name__}: {str(exc)[:80]}"


def float32_gemm_out(dry_run):
    import torch

    device = _device(dry_run)
    m, k, n = (8, 16, 12) if dry_run else (512, 4096, 1024)
    parts, failed = [], False
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        exact = a.double() @ b.double()
        try:
            out = torch.empty(m, n, device=device, dtype=torch.float32)
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            acc = torch.ones(m, n, device=device, dtype=torch.float32)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            fresh = torch.full((m, n), float("nan"), device=device, dtype=torch.float32)  # beta=0 ignores it
            torch.addmm(fresh, a, b, beta=0, alpha=0.5, out_dtype=torch.float32, out=fresh)
            err = max(_rel(out, exact), _rel(acc, exact + 1), _rel(fresh, 0.5 * exact))
            # float32 accumulation and output: ~1e-6; a 16-bit result would be ~1e-3.
            works, what = err < 1e-4, f"works, err {err:.1e}" if err < 1e-4 else f"WRONG, err {err:.1e}"
        except Exception as exc:  # noqa: BLE001 - the refusal is the finding
            works, what = False, f"refused ({type(exc).__name__}: {str(exc).splitlines()[0][:70]}...)"
        says, how = _library_gemm_verdict(device, dtype)
        if says and not works:
            failed = True  # the library would run a GEMM that fails or rounds
        parts.append(f"{str(dtype)[6:]} mm/addmm(out_dtype=float32) {what}; dpo-fast {how} -> {says}")
    return ("FAIL" if failed else "PASS"), f"torch {torch.__version__}: " + "; ".join(parts)


def row_offsets_2_31(dry_run):
    import torch
    import dpo_fast

    device = _device(dry_run)
    rows, vocab = (5, 300) if dry_run else (16385, 131072)
    logits = torch.empty(rows, vocab, dtype=torch.bfloat16, device=device)
    for r0 in range(0, rows, 2048):  # no float32 copy of the whole tensor
        logits[r0:r0 + 2048] = (3 * torch.randn(min(2048, rows - r0), vocab, device=device)).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[1::97] = -100
    logits.requires_grad_()
    upstream = torch.randn(rows, device=device)
    logps = dpo_fast.token_logps_from_logits(logits, labels, impl="chunked")
    (grad,) = torch.autograd.grad(logps, logits, upstream)
    last_start = (rows - 1) * vocab
    sample = sorted({0, rows // 2, rows - 2, rows - 1})
    x = logits.detach()[sample].double()
    log_p = torch.log_softmax(x, -1)
    kept = labels[sample] != -100
    want = torch.where(kept, log_p.gather(1, labels[sample].clamp(min=0)[:, None])[:, 0], 0.0)
    onehot = torch.nn.functional.one_hot(labels[sample].clamp(min=0), vocab).double()
    want_grad = torch.where(kept[:, None], upstream[sample].double()[:, None] * (onehot - log_p.exp()), 0.0)
    logp_err, grad_err = _rel(logps[sample], want), _rel(grad[sample], want_grad)
    bound = torch.finfo(torch.bfloat16).eps + 1e-5  # the gradient is rounded to bf16 once
    ok = logp_err <= 1e-5 and grad_err <= bound and bool(torch.isfinite(logps).all())
    return ("PASS" if ok else "FAIL"), (f"bf16 logits [{rows}, {vocab}], last row at element {last_start} "
                                        f"({last_start / 2**31:.3f} x 2^31): rows {sample} log-prob err "
                                        f"{logp_err:.1e} (<= 1e-5), grad err {grad_err:.1e} (<= {bound:.1e})")


def float32_tf32(dry_run):
    import torch
    import dpo_fast
    from dpo_fast import reference

    device = _device(dry_run)
    n, hidden_size, vocab = (16, 32, 300) if dry_run else (1024, 4096, 32000)
    gen = torch.Generator(device=device).manual_seed(0)
    h = 2 * torch.randn(n, hidden_size, generator=gen, device=device)
    w = torch.randn(vocab, hidden_size, generator=gen, device=device) / hidden_size ** 0.5
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    upstream = torch.randn(n, generator=gen, device=device)

    def run(fn, dtype):
        leaf = h.to(dtype).requires_grad_()
        out = fn(leaf, w.to(dtype))
        return out, torch.autograd.grad(out, leaf, upstream.to(dtype))[0]

    exact = run(lambda x, y: reference.token_outputs(x, y, labels)[0], torch.float64)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        naive = run(lambda x, y: reference.token_outputs(x, y, labels, dtype=None)[0], torch.float32)
        naive_err = [max(_rel(a, b), 1e-7) for a, b in zip(naive, exact)]
        parts, ok = [f"naive IEEE float32 log-prob {naive_err[0]:.1e} grad {naive_err[1]:.1e}"], True
        for tf32 in (False, True):
            torch.set_float32_matmul_precision("high" if tf32 else "highest")
            for impl in ("chunked", "fused"):
                ours = run(lambda x, y: dpo_fast.token_logps(x, y, labels, impl=impl), torch.float32)
                ratios = [_rel(a, b) / e for a, b, e in zip(ours, exact, naive_err)]
                ok &= max(ratios) <= FLOAT32_FACTOR
                parts.append(f"{impl} TF32 {'on' if tf32 else 'off'} {ratios[0]:.1f}x/{ratios[1]:.1f}x")
    finally:
        torch.set_float32_matmul_precision(before)
    return ("PASS" if ok else "FAIL"), (f"float32 head {n}x{hidden_size}x{vocab}, error as a multiple of naive "
                                        f"(log-prob/grad_hidden, bound {FLOAT32_FACTOR:g}x): " + "; ".join(parts))


def autotune_bit_identical(dry_run):
    import torch
    from dpo_fast.kernels import fused_linear_logps as fused
    from dpo_fast.rows import KEPT_ONLY, finish_stats

    device = _device(dry_run)
    n, hidden_size, vocab = (20, 32, 300) if dry_run else (1000, 4096, 32768)
    dtype = torch.bfloat16
    h = torch.randn(n, hidden_size, device=device).to(dtype)
    w = (torch.randn(vocab, hidden_size, device=device) / hidden_size ** 0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=device)
    g = torch.randn(n, device=device)

    def call():
        stats = fused.forward_stats(h, w, None, labels)
        lse = finish_stats(stats, labels, vocab, KEPT_ONLY).lse
        grad_h, grad_w, _ = fused.backward(h, w, None, labels, lse, g)
        return stats, grad_h, grad_w

    tuned_before = {k: len(getattr(fused, k).cache) for k in ("_forward_kernel", "_grad_hidden_kernel",
                                                              "_grad_weight_kernel") if hasattr(getattr(fused, k),
                                                                                                "cache")}
    first = call()
    second = call()
    tuned = {k: len(getattr(fused, k).cache) - v for k, v in tuned_before.items()}
    configs = {k: len(getattr(fused, k).configs) for k in tuned}
    same = [torch.equal(a, b) for a, b in zip(first, second)]
    diffs = [float((a.double() - b.double()).abs().max()) for a, b in zip(first, second)]
    names = ("stats", "grad_hidden", "grad_weight")
    return ("PASS" if all(same) else "FAIL"), (
        f"fused bf16 {n}x{hidden_size}x{vocab}, keys tuned on call 1 {tuned} over configs {configs}: call 1 vs 2 "
        + ", ".join(f"{name} {'identical' if s else f'differ by {d:.1e}'}" for name, s, d in zip(names, same, diffs)))


def _driver_occupancy(compiled) -> int:
    """The CUDA driver's resident blocks per SM of a loaded Triton kernel (its own occupancy calculator)."""
    import ctypes

    libcuda = ctypes.CDLL("libcuda.so.1")
    blocks = ctypes.c_int()
    rc = libcuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(blocks), ctypes.c_void_p(compiled.function), ctypes.c_int(compiled.metadata.num_warps * 32),
        ctypes.c_size_t(compiled.metadata.shared))
    if rc != 0:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor returned CUresult {rc}")
    return blocks.value


def split_sizing_occupancy(dry_run):
    import warnings

    import torch
    from dpo_fast.kernels import fused_linear_logps as fused
    from dpo_fast.kernels.launch import compiled_kernels
    from dpo_fast.rows import KEPT_ONLY, finish_stats

    device = _device(dry_run)
    # autotune_bit_identical's bf16 shapes: their kernels come from Triton's cache
    n, hidden_size, vocab = (20, 32, 300) if dry_run else (1000, 4096, 32768)
    sized, real = [], fused._resident_programs

    def recording(kernel, name, element_size, dev, args, kwargs):
        programs = real(kernel, name, element_size, dev, args, kwargs)
        found = compiled_kernels(kernel, *args, **kwargs) if dev.type == "cuda" else []
        sized.append((name, element_size, programs, found))
        return programs

    fused._resident_programs = recording
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the launcher's fallback to fixed counts warns: a FAIL here
            for dtype in (torch.bfloat16, torch.float32):
                h = torch.randn(n, hidden_size, device=device).to(dtype)
                w = (torch.randn(vocab, hidden_size, device=device) / hidden_size ** 0.5).to(dtype)
                labels = torch.randint(0, vocab, (n,), device=device)
                lse = finish_stats(fused.forward_stats(h, w, None, labels), labels, vocab, KEPT_ONLY).lse
                fused.backward(h, w, None, labels, lse, torch.randn(n, device=device), need_weight=False,
                               need_bias=False)
    finally:
        fused._resident_programs = real
    if dry_run:
        return "SKIP", "dry run: no compiled kernels; sized " + ", ".join(f"{a} {b}B: {c}/SM" for a, b, c, _ in sized)
    parts, ok = [], bool(sized)
    for name, size, programs, found in sized:
        driver = [_driver_occupancy(k) for k in found]
        ok &= bool(found) and all(d == programs for d in driver)
        parts.append(f"{name} {size}B: {'/'.join(str(k.n_regs) for k in found)} registers, sized for {programs} "
                     f"programs/SM, driver {'/'.join(map(str, driver))}")
    return ("PASS" if ok else "FAIL"), f"{torch.cuda.get_device_name()}: " + "; ".join(parts)


def kept_gradient_route(dry_run):
    import dataclasses

    import torch
    import dpo_fast
    from dpo_fast import planner

    device = _device(dry_run)
    seq, hidden_size, vocab = (40, 32, 300) if dry_run else (2048, 2048, 64000)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, seq, hidden_size, generator=gen).to(device, torch.bfloat16)
    w = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size ** 0.5).to(device, torch.bfloat16)
    labels = torch.randint(0, vocab, (2, seq), generator=gen).to(device)
    labels[1, -seq // 8:] = -100  # a shorter rejected side
    original = planner.plan_loss

    def kept_plan(*args, **kwargs):  # the executor is under test here; the planner's choice is priced on CPU
        plan = original(*args, **kwargs)
        scale = (kwargs.get("rejected_scales") or [None])[0]
        chunk = planner.Chunk(0, 1, seq // 3, rejected_scale=scale, keep_gradient=True)
        return dataclasses.replace(plan, route="whole-pairs", chunks=(chunk,))

    parts, ok = [], True
    for loss_type in ("sigmoid", "orpo"):
        results = []
        for forced in (True, False):
            planner.plan_loss = kept_plan if forced else original
            try:
                hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                out = dpo_fast.dpo_loss(hh, ww, labels, impl="chunked", loss_type=loss_type, memory_budget=1 << 40)
                results.append((out.loss, out.chosen_logps, out.rejected_logps,
                                *torch.autograd.grad(out.loss, (hh, ww))))
            finally:
                planner.plan_loss = original
        errs = [_rel(a, b) for a, b in zip(*results)]
        # Both routes compute float32 logits and round each gradient once to bf16: equal up to summation order.
        ok &= max(errs[:3]) <= 1e-5 and max(errs[3:]) <= 2 * torch.finfo(torch.bfloat16).eps
        parts.append(f"{loss_type}: kept pair in 6 pieces vs one chunk: loss/logps/grad_hidden/grad_weight err "
                     + "/".join(f"{e:.1e}" for e in [errs[0], max(errs[1:3]), *errs[3:]]))
    return ("PASS" if ok else "FAIL"), "; ".join(parts)


def non_current_device(dry_run):
    import torch
    import dpo_fast

    if dry_run:
        return "SKIP", "dry run: no CUDA devices"
    if torch.cuda.device_count() < 2:
        return "SKIP", f"{torch.cuda.device_count()} GPU: a non-current device needs two"
    torch.cuda.set_device(0)
    n, hidden_size, vocab = 512, 1024, 32000
    h = torch.randn(n, hidden_size).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden_size) / hidden_size ** 0.5).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n,))
    parts, ok = [], True
    for impl in ("chunked", "fused"):
        results = {}
        for index in (1, 0):
            device = torch.device("cuda", index)
            hh, ww = h.to(device).requires_grad_(), w.to(device).requires_grad_()
            out = dpo_fast.token_logps(hh, ww, labels.to(device), impl=impl)
            grads = torch.autograd.grad(out.sum(), (hh, ww))
            torch.cuda.synchronize(device)
            results[index] = (out, *grads)
            if torch.cuda.current_device() != 0:
                ok = False
                parts.append(f"{impl}: cuda:{torch.cuda.current_device()} left current")
        errs = [_rel(a, b) for a, b in zip(results[1], results[0])]
        # Same card, same kernels: equal up to a different autotuned tile's summation order (and the
        # gradients' one bf16 rounding).
        ok &= errs[0] <= 1e-5 and max(errs[1:]) <= torch.finfo(torch.bfloat16).eps
        parts.append(f"{impl} on cuda:1 vs cuda:0: log-prob/grad_hidden/grad_weight err "
                     + "/".join(f"{e:.1e}" for e in errs))
    return ("PASS" if ok else "FAIL"), "cuda:0 current; " + "; ".join(parts)


def _median_ms(run, repeats=15):
    """Median CUDA-event time of ``run()`` (which records its own start and end events: returns them)."""
    times = []
    for _ in range(repeats):
        start, end = run()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def stream_overlap(dry_run):
    import torch
    from dpo_fast.gemm import mm_float32
    from dpo_fast.rows import KEPT_ONLY, TritonRows, init_stats
    from dpo_fast.transform import LogitTransform

    if dry_run:
        return "SKIP", "dry run: no CUDA streams to overlap"
    device = torch.device("cuda")
    tokens, hidden_size, vocab = 2048, 4096, 128256
    h = torch.randn(tokens, hidden_size, device=device).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden_size, device=device) / hidden_size ** 0.5).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    tile, next_tile = (torch.empty(tokens, vocab, device=device) for _ in range(2))
    mm_float32(h, w.t(), tile)
    stats = init_stats(tokens, device)
    rows, transform = TritonRows(), LogitTransform()
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()

    def gemm():
        mm_float32(h, w.t(), next_tile)

    def row_pass():
        rows.stats(tile, labels, stats, vocab_start=0, ignore_index=KEPT_ONLY, transform=transform)

    def alone(work):
        def run():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            return start, end
        return run

    def together():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        side.wait_event(start)
        with torch.cuda.stream(side):
            row_pass()
            side_done = torch.cuda.Event()
            side_done.record(side)
        gemm()
        main.wait_event(side_done)
        end.record(main)
        return start, end

    for work in (gemm, row_pass):  # compile and warm up
        work()
    torch.cuda.synchronize()
    t_gemm, t_rows, t_both = _median_ms(alone(gemm)), _median_ms(alone(row_pass)), _median_ms(together)
    hidden = (t_gemm + t_rows - t_both) / min(t_gemm, t_rows)
    return "PASS", (f"logits GEMM [{tokens}x{vocab}, H {hidden_size}] {t_gemm:.3f} ms, stats pass on its float32 tile "
                    f"{t_rows:.3f} ms, both on two streams {t_both:.3f} ms: {100 * hidden:.0f}% of the shorter hidden")


CHECKS = {f.__name__: f for f in (float32_gemm_out, row_offsets_2_31, float32_tf32, autotune_bit_identical,
                                  split_sizing_occupancy, kept_gradient_route, non_current_device,
                                  stream_overlap)}


# ----------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------

def run_one(name: str, dry_run: bool) -> str:
    """One check in this process: its verdict line."""
    try:
        status, figure = CHECKS[name](dry_run)
    except Exception as exc:  # noqa: BLE001 - a crash is a FAIL with its reason, and the stage goes on
        message = str(exc).strip().splitlines()
        status, figure = "FAIL", f"{type(exc).__name__}: {message[0][:300] if message else ''}"
    return f"{status} {name}: {figure}"


def run_all(names, dry_run: bool, budget_s: float) -> int:
    """The checks in child processes, within the stage budget; prints every verdict line. Returns #FAIL.

    On a GPU each check has its own process; a dry run puts them all in one (importing torch twice
    on a busy CI machine costs more than the checks).
    """
    deadline = time.monotonic() + budget_s
    env = dict(os.environ)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # CPU tensors reach Triton through its interpreter
    python = [sys.executable] + (["-P"] if sys.flags.safe_path else [])
    failures = 0
    for group in ([list(names)] if dry_run else [[name] for name in names]):
        left = deadline - time.monotonic()
        if left < 5:
            for name in group:
                print(f"SKIP {name}: the stage's {budget_s:g} s were spent", flush=True)
            continue
        limit = min(left, sum(PER_CHECK_S[name] for name in group))
        command = python + ["-m", "benchmarks.gpu_checks", "--only", ",".join(group)]
        start = time.monotonic()
        try:
            done = subprocess.run(command + (["--dry-run"] if dry_run else []), env=env, capture_output=True,
                                  text=True, timeout=limit)
            verdicts = {line.split(" ", 2)[1].rstrip(":"): line for line in done.stdout.splitlines()
                        if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")}
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            lines = [verdicts.get(name, f"FAIL {name}: exit code {done.returncode} without a verdict: {tail}")
                     for name in group]
        except subprocess.TimeoutExpired as stopped:
            printed = (stopped.stdout or b"").decode() if isinstance(stopped.stdout, bytes) else stopped.stdout or ""
            verdicts = {line.split(" ", 2)[1].rstrip(":"): line for line in printed.splitlines()
                        if line.split(" ", 1)[0] in ("PASS", "FAIL", "SKIP")}
            lines = [verdicts.get(name, f"FAIL {name}: no verdict within {limit:.0f} s") for name in group]
        for line in lines:
            failures += line.startswith("FAIL")
            print(f"{line} [{time.monotonic() - start:.1f} s]", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: proves the script only")
    parser.add_argument("--budget-s", type=float, default=120.0, help="the whole stage's seconds")
    parser.add_argument("--only", help="comma-separated checks to run in this process, of: " + ", ".join(CHECKS))
    args = parser.parse_args(argv)
    if args.only:
        names = args.only.split(",")
        unknown = [name for name in names if name not in CHECKS]
        if unknown:
            parser.error(f"unknown checks {unknown}; known: {list(CHECKS)}")
        for name in names:
            print(run_one(name, args.dry_run), flush=True)
        return 0
    failures = run_all(list(CHECKS), args.dry_run, args.budget_s)
    print(f"gpu checks: {failures} FAIL", flush=True)
    return 0  # the GPU run goes on: verdicts are in the lines above


if __name__ == "__main__":
    sys.exit(main())
