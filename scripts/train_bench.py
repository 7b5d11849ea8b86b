#!/usr/bin/env python3
"""train_bench.py: the measurement that decides issue 18 (gpumem as PyTorch's CUDA allocator).

What it does. It trains four real models with random weights and random data (no downloads),
each in a fresh process per allocator, and compares the allocators on the same GPU:

  model     what one step is
  resnet50  torchvision ResNet-50, batch 64, fp32, SGD with momentum
  gpt2      transformers GPT-2 124M (GPT2Config()), batch 8 x 1024, bf16 autocast, AdamW
  vit       timm vit_base_patch16_224 (torchvision vit_b_16 without timm), batch 64,
            fp16 autocast with a GradScaler, AdamW
  bert      transformers BertForMaskedLM(BertConfig()), a random batch size and length at every
            step (4-48 x 32-511, from a fixed seed, so every allocator sees the same sequence)

  allocator     how the child process gets it
  default       PyTorch's own caching allocator
  expandable    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the child's environment
  gpumem-torch  gpumem.torch.enable(policy="torch") right after `import torch`
  gpumem        gpumem.torch.enable(policy="gpumem") right after `import torch`

Why this shape. Issue 18 judges gpumem where users feel it: losses must stay bit-identical to
PyTorch's (anything else means corrupted memory), the gpumem policy must keep reserved memory
within 2% of allocated at no more than 2% step-time cost, and it must fit at least as large a batch
under a memory cap. Step times of two identical runs differ by up to 18%, so every allocator runs
once per round, rounds are interleaved (the order rotates from round to round) and medians of the
per-run medians are compared.

Per training run (one child process) it records: the median step time over --steps steps after
--warmup warm-up steps (torch.cuda.synchronize() ends each timed step), peak memory_allocated and
memory_reserved, the driver's used memory (total - free from mem_get_info, sampled after each step
outside the timed region) at the step that set the reserved peak and its maximum, the loss at
every step as float.hex() (bit-identity) and as a float, and torch.cuda.memory_stats() at the end.

The largest batch under a cap (GPT-2 under 24 GiB, ResNet-50 under 16 GiB, the cap set with
torch.cuda.set_per_process_memory_fraction(cap / total)) is searched in one process per
allocator: each trial builds the model afresh from a CPU copy, runs --search-steps full training
steps (forward, backward, optimizer), and an out-of-memory error (torch.OutOfMemoryError, or a
RuntimeError starting "CUDA out of memory") is caught, everything freed (gc.collect() and
torch.cuda.empty_cache()) and the search goes on: exponential from the model's usual batch, then
binary.

Process starts are hidden: up to --prestart children are started ahead. Each imports torch (and
gpumem), builds its model on the CPU, and then waits, without touching CUDA, until the parent
tells it to go, when the previous child has finished. The children's JSON files are written even
when they fail midway (errors are recorded), and the parent kills a child that runs past
--child-timeout, keeping what it had written.

Usage on the GPU machine (two invocations of under 9 minutes each):
    python3 scripts/train_bench.py --models resnet50,gpt2 --out bench-a.json
    python3 scripts/train_bench.py --models vit,bert --no-max-batch --out bench-b.json
    python3 scripts/train_bench.py --merge bench-a.json bench-b.json --out bench.json
Smoke test without a GPU:
    python3 scripts/train_bench.py --device cpu --tiny --allocators default,expandable \
        --steps 4 --warmup 1 --rounds 2 --out /tmp/smoke.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

MODELS = ["resnet50", "gpt2", "vit", "bert"]
ALLOCATORS = ["default", "expandable", "gpumem-torch", "gpumem"]
GPUMEM_POLICY = {"gpumem-torch": "torch", "gpumem": "gpumem"}
FIXED_SHAPE = ["resnet50", "gpt2", "vit"]  # acceptance 3 compares memory_stats on these
# Issue 18's table (H200, PyTorch 2.11, default allocator), for the time estimate only.
EST_STEP_MS = {"resnet50": 35.0, "gpt2": 80.0, "vit": 50.0, "bert": 110.0}
CAP_GIB = {"gpt2": 24, "resnet50": 16}
REFERENCE_MAX_BATCH = {"gpt2": {"default": 15, "expandable": 16},
                       "resnet50": {"default": 192, "expandable": 194}}
# What a child costs besides its steps when its start is not hidden: torch import, model build,
# CUDA init (issue 18 brief: about 15 s). With --prestart only the CUDA part shows (~3 s).
EST_START_S = 15.0
EST_START_HIDDEN_S = 4.0
EST_SEARCH_S = 25.0
GIB = 1 << 30


# =============================================================================================
# Child side: one model, one allocator, one process.
# =============================================================================================

class Workload:
    """One model: its CPU-built module, how to make step i's batch, and its loss."""

    def __init__(self, name, tiny, torch, device):
        self.name, self.tiny, self.torch, self.device = name, tiny, torch, device
        self.amp_dtype = None  # autocast dtype, or None for fp32
        self.scaler = False  # fp16 autocast needs a GradScaler
        self.impl = ""
        if name == "resnet50":
            import torchvision
            self.model = torchvision.models.resnet50(weights=None, num_classes=10 if tiny else 1000)
            self.impl = "torchvision.models.resnet50"
            self.batch, self.classes, self.px = (4, 10, 32) if tiny else (64, 1000, 224)
        elif name == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel
            cfg = (GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=1000)
                   if tiny else GPT2Config())
            cfg.use_cache = False
            self.model = GPT2LMHeadModel(cfg)
            self.impl = "transformers.GPT2LMHeadModel"
            self.vocab = cfg.vocab_size
            self.batch, self.seq = (2, 64) if tiny else (8, 1024)
            self.amp_dtype = torch.bfloat16
        elif name == "vit":
            kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10) if tiny else {}
            try:
                import timm
                self.model = timm.create_model("vit_base_patch16_224", pretrained=False, **kw)
                self.impl = "timm vit_base_patch16_224"
            except ImportError:
                import torchvision
                tkw = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64,
                           mlp_dim=128, num_classes=10) if tiny else {}
                if tiny:
                    self.model = torchvision.models.VisionTransformer(**tkw)
                else:
                    self.model = torchvision.models.vit_b_16(weights=None)
                self.impl = "torchvision vit_b_16"
            self.batch, self.classes, self.px = (4, 10, 32) if tiny else (64, 1000, 224)
            self.amp_dtype, self.scaler = torch.float16, True
        elif name == "bert":
            from transformers import BertConfig, BertForMaskedLM
            cfg = (BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=128, max_position_embeddings=128) if tiny else BertConfig())
            self.model = BertForMaskedLM(cfg)
            self.impl = "transformers.BertForMaskedLM"
            self.vocab = cfg.vocab_size
            self.batch = None  # random per step
        else:
            raise SystemExit("unknown model %r (choose from %s)" % (name, ",".join(MODELS)))

    def bert_shapes(self, n):
        """The (batch, length) of each of n steps: fixed seed, the same for every allocator."""
        import random
        rng = random.Random(18)
        lo_b, hi_b, lo_l, hi_l = (2, 6, 8, 63) if self.tiny else (4, 48, 32, 511)
        return [(rng.randint(lo_b, hi_b), rng.randint(lo_l, hi_l)) for _ in range(n)]

    def optimizer(self, model):
        torch = self.torch
        if self.name == "resnet50":
            # lr 0.01: with random labels, 0.1 drives the loss up towards inf, and a run of NaN
            # losses would be "bit-identical" whatever the allocator did
            return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return torch.optim.AdamW(model.parameters(), lr=1e-4)

    def make_batch(self, batch, shape=None):
        """Random inputs on the device (global CUDA generator: the same for every allocator)."""
        torch, dev = self.torch, self.device
        if self.name in ("resnet50", "vit"):
            x = torch.randn(batch, 3, self.px, self.px, device=dev)
            y = torch.randint(0, self.classes, (batch,), device=dev)
            return (x, y)
        if self.name == "gpt2":
            return (torch.randint(0, self.vocab, (batch, self.seq), device=dev),)
        b, l = shape
        return (torch.randint(0, self.vocab, (b, l), device=dev),)

    def loss(self, model, inputs):
        torch = self.torch
        if self.name in ("resnet50", "vit"):
            x, y = inputs
            return torch.nn.functional.cross_entropy(model(x), y)
        ids = inputs[0]
        return model(input_ids=ids, labels=ids).loss


def is_oom(exc):
    """PyTorch's OOM error, or a RuntimeError that says it is one (what a plugin may raise)."""
    import torch
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("CUDA out of memory")


def train_step(wl, model, opt, scaler, inputs, simulate_oom=False):
    """One full training step: forward (under autocast if the model uses it), backward, optimizer."""
    torch = wl.torch
    dev_type = "cuda" if str(wl.device).startswith("cuda") else "cpu"
    with torch.autocast(dev_type, dtype=wl.amp_dtype or torch.float32, enabled=wl.amp_dtype is not None):
        loss = wl.loss(model, inputs)
    if simulate_oom:
        raise RuntimeError("CUDA out of memory. (simulated by train_bench.py --device cpu)")
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return loss


class ChildResult:
    """The child's JSON, written atomically at each flush, so a crash or a kill loses little."""

    def __init__(self, spec):
        self.path = spec["out"]
        self.d = {"spec": spec, "ok": False, "errors": [], "phase": "start", "times": {}}

    def flush(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.d, f)
        os.replace(tmp, self.path)


def child_main(spec):
    res = ChildResult(spec)
    d = res.d
    t_start = time.perf_counter()
    try:
        d["phase"] = "import"
        res.flush()
        import torch
        alloc = spec["allocator"]
        if alloc in GPUMEM_POLICY:
            try:
                import gpumem.torch  # noqa: F401
            except Exception as e:
                raise RuntimeError("train_bench: `import gpumem.torch` failed (%s: %s). Install the gpumem "
                                   "wheel (pip install the one in .gpu/), or leave the gpumem allocators out "
                                   "with --allocators default,expandable." % (type(e).__name__, e))
            gpumem.torch.enable(policy=GPUMEM_POLICY[alloc], **spec.get("gpumem_options", {}))
        d["torch_version"] = torch.__version__
        d["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        d["cublas_workspace_config"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")
        d["times"]["import_s"] = time.perf_counter() - t_start

        d["phase"] = "build"
        import random
        random.seed(0)
        torch.manual_seed(0)
        torch.use_deterministic_algorithms(True, warn_only=spec.get("det_warn_only", False))
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        device = spec["device"]
        # Few CPU threads while building: prestarted children build while another child is timed.
        threads = torch.get_num_threads()
        torch.set_num_threads(min(2, threads))
        wl = Workload(spec["model"], spec["tiny"], torch, device)
        d["model_impl"] = wl.impl
        d["params"] = sum(p.numel() for p in wl.model.parameters())
        d["times"]["build_s"] = time.perf_counter() - t_start
        if device.startswith("cuda") and torch.cuda.is_initialized():
            raise RuntimeError("CUDA was initialized before the parent's go (by gpumem.torch.enable or "
                               "model building): prestarted children would hold GPU memory")
        if spec.get("ready"):
            d["phase"] = "waiting"
            res.flush()
            with open(spec["ready"], "w") as f:
                f.write("ready\n")
            if sys.stdin.readline().strip() != "go":
                d["errors"].append("parent did not say go")
                return 2
        t_go = time.perf_counter()
        torch.set_num_threads(threads)

        d["phase"] = "cuda init"
        if device.startswith("cuda"):
            torch.cuda.init()
            torch.cuda.manual_seed_all(0)
            d["device_name"] = torch.cuda.get_device_name()
            try:
                d["allocator_backend"] = torch.cuda.memory.get_allocator_backend()
            except Exception as e:  # not every version has it
                d["allocator_backend"] = "? (%s)" % e
            free, total = torch.cuda.mem_get_info()
            d["device_total"] = total
            d["driver_used_after_init"] = total - free
        d["times"]["cuda_init_s"] = time.perf_counter() - t_go
        if spec["mode"] == "train":
            run_train(spec, wl, res, torch)
        else:
            run_search(spec, wl, res, torch)
        d["ok"] = not d["errors"]
        d["phase"] = "done"
        return 0
    except BaseException as e:  # record everything, even KeyboardInterrupt/SystemExit
        d["errors"].append("%s: %s\n%s" % (type(e).__name__, e, traceback.format_exc()[-4000:]))
        return 1
    finally:
        d["times"]["total_s"] = time.perf_counter() - t_start
        res.flush()


def run_train(spec, wl, res, torch):
    """The timed run: warm-up, then measured steps, each synchronized at its end."""
    d = res.d
    cuda = spec["device"].startswith("cuda")
    model = wl.model.to(spec["device"])
    model.train()
    opt = wl.optimizer(model)
    scaler = torch.amp.GradScaler("cuda" if cuda else "cpu") if wl.scaler else None
    n = spec["warmup"] + spec["steps"]
    shapes = wl.bert_shapes(n) if wl.name == "bert" else None
    d["batch"] = wl.batch
    if shapes:
        d["shapes_head"] = shapes[:5]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    d.update(step_ms=[], losses_hex=[], losses=[])
    peak_reserved = -1
    d["driver_used_at_peak"] = None
    d["driver_used_max"] = None
    d["phase"] = "steps"
    for i in range(n):
        sync()
        t0 = time.perf_counter()
        inputs = wl.make_batch(wl.batch, shapes[i] if shapes else None)
        loss = train_step(wl, model, opt, scaler, inputs)
        sync()
        dt = time.perf_counter() - t0
        # outside the timed region: the loss, the memory figures
        v = loss.item()
        d["step_ms"].append(dt * 1e3)
        d["losses_hex"].append(float(v).hex())
        d["losses"].append(v)
        del loss, inputs
        if cuda:
            r = torch.cuda.max_memory_reserved()
            free, total = torch.cuda.mem_get_info()
            used = total - free
            d["driver_used_max"] = max(used, d["driver_used_max"] or 0)
            if r > peak_reserved:  # this step set the reserved peak
                peak_reserved = r
                d["driver_used_at_peak"] = used
                d["peak_step"] = i
        if i == spec["warmup"] - 1 or (i + 1) % 25 == 0:
            res.flush()
    d["nonfinite_losses"] = sum(1 for v in d["losses"] if v != v or v in (float("inf"), float("-inf")))
    measured = d["step_ms"][spec["warmup"]:]
    d["median_step_ms"] = statistics.median(measured) if measured else None
    if cuda:
        d["peak_allocated"] = torch.cuda.max_memory_allocated()
        d["peak_reserved"] = torch.cuda.max_memory_reserved()
        d["end_allocated"] = torch.cuda.memory_allocated()
        d["end_reserved"] = torch.cuda.memory_reserved()
        d["memory_stats"] = {k: v for k, v in torch.cuda.memory_stats().items()}


def run_search(spec, wl, res, torch):
    """Largest batch under the cap, in this one process, recovering from every OOM."""
    import copy
    import gc
    d = res.d
    cuda = spec["device"].startswith("cuda")
    cap = spec["cap_gib"] * GIB
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        frac = min(1.0, cap / total)
        torch.cuda.set_per_process_memory_fraction(frac)
        d["cap_bytes"], d["fraction"] = cap, frac
    fake_limit = spec.get("cpu_fake_limit")  # --device cpu: batches above it raise a simulated OOM
    cpu_model = wl.model
    d["trials"] = []
    d["phase"] = "search"

    def trial(b):
        st = {}
        ok, err, t0 = True, None, time.perf_counter()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            st["model"] = copy.deepcopy(cpu_model).to(spec["device"])
            st["model"].train()
            st["opt"] = wl.optimizer(st["model"])
            scaler = torch.amp.GradScaler("cuda" if cuda else "cpu") if wl.scaler else None
            for _ in range(spec["search_steps"]):
                st["inputs"] = wl.make_batch(b)
                st["loss"] = train_step(wl, st["model"], st["opt"], scaler, st["inputs"],
                                        simulate_oom=fake_limit is not None and b > fake_limit)
                st["loss"].item()
                if cuda:
                    torch.cuda.synchronize()
        except Exception as e:
            if not is_oom(e):
                raise
            ok = False
            lines = str(e).strip().splitlines()
            err = "%s: %s" % (type(e).__name__, lines[0][:400] if lines else "")
        # free everything: the trial's objects, the exception's frames (gone with `e`), the cache
        st.clear()
        gc.collect()
        t = {"batch": b, "fits": ok, "seconds": round(time.perf_counter() - t0, 3)}
        if cuda:
            t["peak_allocated"] = torch.cuda.max_memory_allocated()
            t["peak_reserved"] = torch.cuda.max_memory_reserved()
            torch.cuda.empty_cache()
            t["reserved_after_empty_cache"] = torch.cuda.memory_reserved()
        else:
            gc.collect()
        if err:
            t["error"] = err
        d["trials"].append(t)
        res.flush()
        return ok

    good, bad = 0, None
    b = wl.batch
    if trial(b):
        good = b
        while bad is None:
            b *= 2
            if b > spec["search_max"]:
                d["errors"].append("no OOM up to batch %d: the cap does not bind" % spec["search_max"])
                break
            if trial(b):
                good = b
            else:
                bad = b
    else:
        bad = b
        while good == 0 and b > 1:
            b //= 2
            if trial(b):
                good = b
            else:
                bad = b
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        if trial(mid):
            good = mid
        else:
            bad = mid
    d["max_batch"] = good
    d["first_oom_batch"] = bad
    # A model that no longer fits after the OOMs would mean the allocator lost memory.
    if cuda:
        d["reserved_at_end"] = torch.cuda.memory_reserved()
        d["allocated_at_end"] = torch.cuda.memory_allocated()


# =============================================================================================
# Parent side: the plan, the children, the summary.
# =============================================================================================

def rotate(xs, k):
    k %= len(xs)
    return xs[k:] + xs[:k]


def make_plan(args):
    """Round-major and interleaved: round r runs every model with the allocators rotated by r.
    The cap searches come after round 0, so a run cut short by the time budget keeps them."""
    plan = []
    for r in range(args.rounds):
        for m in args.models:
            for a in rotate(args.allocators, r):
                plan.append({"mode": "train", "model": m, "allocator": a, "round": r})
        if r == 0 and args.max_batch:
            for m in args.models:
                if m in CAP_GIB:
                    for a in args.allocators:
                        plan.append({"mode": "search", "model": m, "allocator": a, "round": 0,
                                     "cap_gib": CAP_GIB[m]})
    return plan


def estimate_s(item, args, hidden):
    start = EST_START_HIDDEN_S if hidden else EST_START_S
    if item["mode"] == "search":
        return start + EST_SEARCH_S
    return start + (args.warmup + args.steps) * EST_STEP_MS[item["model"]] / 1e3


def child_env(alloc):
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if alloc == "expandable":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    env["PYTHONHASHSEED"] = "0"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


class Child:
    def __init__(self, item, args, idx):
        tag = "%03d-%s-%s-%s-r%d" % (idx, item["mode"], item["model"], item["allocator"], item["round"])
        self.item, self.tag = item, tag
        self.out = os.path.join(args.workdir, tag + ".json")
        self.ready = os.path.join(args.workdir, tag + ".ready")
        for p in (self.out, self.ready):
            if os.path.exists(p):
                os.remove(p)
        spec = dict(item, out=self.out, ready=self.ready, device=args.device, tiny=args.tiny,
                    steps=args.steps, warmup=args.warmup, search_steps=args.search_steps,
                    search_max=args.search_max, det_warn_only=args.det_warn_only,
                    gpumem_options=args.gpumem_options)
        if args.device == "cpu" and item["mode"] == "search":
            spec["cpu_fake_limit"] = {"gpt2": 3, "resnet50": 5}[item["model"]]
        self.log = open(os.path.join(args.workdir, tag + ".log"), "w")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=child_env(item["allocator"]), text=True)
        self.started = time.time()

    def wait_ready(self, timeout):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if os.path.exists(self.ready) or self.proc.poll() is not None:
                return True
            time.sleep(0.05)
        return False

    def go(self):
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def result(self, extra_error=None):
        try:
            with open(self.out) as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            r = {"spec": self.item, "ok": False, "errors": ["no JSON from the child (%s)" % e]}
        r.setdefault("errors", [])
        if extra_error:
            r["errors"].append(extra_error)
            r["ok"] = False
        if self.proc.returncode not in (0, None):
            r["returncode"] = self.proc.returncode
            r["ok"] = False
            if not r["errors"]:
                r["errors"].append("child exited with %s" % self.proc.returncode)
        r["tag"] = self.tag
        r["log"] = self.log.name
        self.log.close()
        for k in ("mode", "model", "allocator", "round"):
            r[k] = self.item[k]
        return r


def check_gpumem_importable():
    p = subprocess.run([sys.executable, "-c", "import torch, gpumem.torch"], capture_output=True, text=True)
    return p.returncode == 0, (p.stderr.strip().splitlines() or [""])[-1]


def run_plan(args, plan, results, save):
    t_begin = time.time()
    pending = list(plan)
    live = []
    idx = len(results)
    skipped = []

    def start_next():
        nonlocal idx
        live.append(Child(pending.pop(0), args, idx))
        idx += 1

    while pending or live:
        if not live:
            start_next()
        c = live.pop(0)
        elapsed = time.time() - t_begin
        est = estimate_s(c.item, args, hidden=args.prestart > 0)
        if args.time_budget and elapsed + est > args.time_budget:
            for o in [c] + live:
                o.kill()
                o.result()
                skipped.append(o.item)
            skipped.extend(pending)
            live, pending = [], []
            print("time budget: %.0f s spent, %d runs left out (the next one estimated at %.0f s)"
                  % (elapsed, len(skipped), est), flush=True)
            break
        note = None
        if not c.wait_ready(args.prep_timeout):
            note = "killed: not ready after %d s" % args.prep_timeout
            c.kill()
        else:
            c.go()
            while pending and len(live) < args.prestart:  # start the next ones while this one runs
                start_next()
            try:
                c.proc.wait(timeout=args.child_timeout)
            except subprocess.TimeoutExpired:
                note = "killed after --child-timeout %d s" % args.child_timeout
                c.kill()
        r = c.result(note)
        results.append(r)
        print(one_line(r, time.time() - t_begin), flush=True)
        save()
    return skipped


def one_line(r, elapsed):
    s = "[%6.0f s] %-6s %-8s %-12s round %d: " % (elapsed, r["mode"], r["model"], r["allocator"], r["round"])
    if r["mode"] == "train" and r.get("median_step_ms") is not None:
        s += "median %.2f ms" % r["median_step_ms"]
        if r.get("peak_reserved"):
            s += ", peak reserved %.3f GiB / allocated %.3f GiB" % (r["peak_reserved"] / GIB, r["peak_allocated"] / GIB)
    if r["mode"] == "search" and "max_batch" in r:
        s += "largest batch %s (%d trials)" % (r["max_batch"], len(r.get("trials", [])))
    if not r.get("ok"):
        s += " FAILED: " + (r["errors"][0].splitlines()[0] if r.get("errors") else "?")
    t = r.get("times", {})
    if t.get("total_s"):
        s += "  [child %.1f s, start %.1f s]" % (t["total_s"], t.get("build_s", 0))
    return s


# ------------------------------------------------------------------ summary and acceptance ---

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def first_diff(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    if len(a) != len(b):
        return min(len(a), len(b))
    return None


def summarize(results, models, allocators):
    """Per model x allocator figures, from the children's JSON."""
    s = {}
    for m in models:
        s[m] = {}
        runs_by = {a: [r for r in results if r["mode"] == "train" and r["model"] == m and r["allocator"] == a]
                   for a in allocators}
        ref_runs = [r for r in runs_by.get("default", []) if r.get("losses_hex")]
        ref = ref_runs[0] if ref_runs else None
        for a in allocators:
            runs = runs_by[a]
            ok = [r for r in runs if r.get("ok")]
            e = {"runs": len(runs), "ok_runs": len(ok),
                 "errors": [r["errors"][0].splitlines()[0] for r in runs if r.get("errors")]}
            e["round_medians_ms"] = [r["median_step_ms"] for r in ok]
            e["median_step_ms"] = med(e["round_medians_ms"])
            e["peak_reserved"] = med([r.get("peak_reserved") for r in ok])
            e["peak_allocated"] = med([r.get("peak_allocated") for r in ok])
            ratios = [r["peak_reserved"] / r["peak_allocated"] for r in ok if r.get("peak_allocated")]
            e["reserved_over_allocated"] = med(ratios)
            e["reserved_over_allocated_max"] = max(ratios) if ratios else None
            e["nonfinite_losses"] = max([r.get("nonfinite_losses", 0) for r in ok] or [0])
            e["driver_used_at_peak"] = med([r.get("driver_used_at_peak") for r in ok])
            e["driver_used_max"] = med([r.get("driver_used_max") for r in ok])
            # bit-identity of the losses with default's first run, over every run of this allocator
            if ref is None:
                e["losses_identical"] = None
            else:
                diffs = []
                for r in runs:
                    if r is ref:
                        continue
                    fd = first_diff(ref["losses_hex"], r.get("losses_hex") or [])
                    if fd is not None:
                        diffs.append({"round": r["round"], "first_diff_step": fd})
                e["losses_identical"] = not diffs and bool(runs)
                e["loss_diffs"] = diffs
            s[m][a] = e
        for a in allocators:
            dm = s[m].get("default", {}).get("median_step_ms")
            am = s[m][a]["median_step_ms"]
            s[m][a]["ratio_to_default"] = am / dm if dm and am else None
        # largest batch under the cap
        for a in allocators:
            sr = [r for r in results if r["mode"] == "search" and r["model"] == m and r["allocator"] == a]
            if sr:
                s[m][a]["max_batch"] = sr[-1].get("max_batch") if sr[-1].get("ok") else None
                s[m][a]["max_batch_error"] = (sr[-1]["errors"][0].splitlines()[0] if sr[-1].get("errors") else None)
        # memory_stats of gpumem-torch against default's (acceptance 3)
        if m in FIXED_SHAPE and "default" in allocators and "gpumem-torch" in allocators:
            d_runs = [r for r in runs_by["default"] if r.get("memory_stats")]
            g_runs = [r for r in runs_by["gpumem-torch"] if r.get("memory_stats")]
            if d_runs and g_runs:
                ds, gs = d_runs[0]["memory_stats"], g_runs[0]["memory_stats"]
                noisy = set()
                for r in d_runs[1:]:
                    noisy |= {k for k in set(ds) | set(r["memory_stats"]) if ds.get(k) != r["memory_stats"].get(k)}
                diff = {k: {"default": ds.get(k), "gpumem-torch": gs.get(k), "differs_between_default_runs": k in noisy}
                        for k in sorted(set(ds) | set(gs)) if ds.get(k) != gs.get(k)}
                s[m]["memory_stats_diff"] = diff
                s[m]["memory_stats_keys_compared"] = len(set(ds) | set(gs))
    return s


def fmt_gib(x):
    return "%.3f" % (x / GIB) if x else "-"


def table(s, models, allocators):
    lines = ["| model | allocator | median step ms (round medians) | / default | peak reserved GiB | "
             "peak allocated GiB | reserved/allocated | driver used at peak GiB | losses = default | "
             "largest batch under cap |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        for a in allocators:
            e = s[m][a]
            if e["median_step_ms"] is None and not e.get("max_batch"):
                err = e["errors"][0] if e["errors"] else "not run"
                lines.append("| %s | %s | failed: %s | | | | | | | %s |" % (m, a, err[:120], e.get("max_batch", "-")))
                continue
            rm = ", ".join("%.1f" % x for x in e["round_medians_ms"])
            li = e.get("losses_identical")
            if a == "default" and li is not None:
                lid = "reference" + ("" if li else " (runs differ: step %s)" % [d["first_diff_step"] for d in e["loss_diffs"]])
            elif li is None:
                lid = "-"
            elif li:
                lid = "yes"
            else:
                lid = "no, step %s" % min(d["first_diff_step"] for d in e["loss_diffs"])
            mb = e.get("max_batch")
            mbs = "-" if m not in CAP_GIB else ("%s" % mb if mb is not None else
                                                ("failed" if e.get("max_batch_error") else "-"))
            lines.append("| %s | %s | %s (%s) | %s | %s | %s | %s | %s | %s | %s |" % (
                m, a, "%.2f" % e["median_step_ms"] if e["median_step_ms"] else "-", rm,
                "%.3f" % e["ratio_to_default"] if e["ratio_to_default"] else "-",
                fmt_gib(e["peak_reserved"]), fmt_gib(e["peak_allocated"]),
                "%.3f" % e["reserved_over_allocated"] if e["reserved_over_allocated"] else "-",
                fmt_gib(e["driver_used_at_peak"]), lid, mbs))
    return "\n".join(lines)


def acceptance(s, models, allocators):
    """Issue 18's acceptance points 1-3, one PASS/FAIL line each per model (n/a when not run)."""
    out = []

    def line(ok, text):
        out.append("%s  %s" % ("n/a " if ok is None else ("PASS" if ok else "FAIL"), text))

    # 1. losses bit-identical to default under both gpumem policies
    for m in models:
        dflt = s[m].get("default")
        if dflt and dflt.get("nonfinite_losses"):
            line(False, "1 %s: default's losses are not all finite (%d): bit-identity proves little, change the model"
                 % (m, dflt["nonfinite_losses"]))
        if dflt and dflt.get("losses_identical") is False:
            line(False, "1 %s: two PyTorch default runs differ (steps %s): replace the model"
                 % (m, [d["first_diff_step"] for d in dflt["loss_diffs"]]))
        for a in ("gpumem-torch", "gpumem"):
            if a not in allocators or dflt is None:
                continue
            e = s[m][a]
            li = e.get("losses_identical")
            if li is None or e["runs"] == 0:
                line(None, "1 %s %s: no losses to compare" % (m, a))
            else:
                line(li, "1 %s %s: losses bit-identical to default in %d/%d runs%s" % (
                    m, a, e["runs"] - len(e["loss_diffs"]), e["runs"],
                    "" if li else "; first differing step %s" % min(d["first_diff_step"] for d in e["loss_diffs"])))
    # 2. the gpumem policy
    if "gpumem" in allocators:
        for m in models:
            g, d, x = s[m]["gpumem"], s[m].get("default"), s[m].get("expandable")
            ro = g["reserved_over_allocated"]
            if ro is None:
                line(None, "2 %s: reserved/allocated not measured" % m)
            else:
                xo = x["reserved_over_allocated"] if x else None
                ok = ro <= 1.02 and (xo is None or ro <= xo)
                line(ok, "2 %s: peak reserved / allocated %.4f (max over runs %.4f) <= 1.02 and <= expandable's %s"
                     % (m, ro, g["reserved_over_allocated_max"], "%.4f" % xo if xo else "(not run)"))
            if d and g["median_step_ms"] and d["median_step_ms"]:
                line(g["median_step_ms"] <= 1.02 * d["median_step_ms"],
                     "2 %s: median step %.2f ms <= 1.02 x default's %.2f ms (ratio %.3f; round medians %s vs %s)"
                     % (m, g["median_step_ms"], d["median_step_ms"], g["median_step_ms"] / d["median_step_ms"],
                        ["%.1f" % v for v in g["round_medians_ms"]], ["%.1f" % v for v in d["round_medians_ms"]]))
            else:
                line(None, "2 %s: step time not compared (a run is missing)" % m)
            if m in CAP_GIB:
                gb = g.get("max_batch")
                others = {a: s[m][a].get("max_batch") for a in ("default", "expandable") if a in allocators}
                if gb is None or any(v is None for v in others.values()):
                    line(None, "2 %s: largest batch under %d GiB not measured for all (%s, gpumem %s)"
                         % (m, CAP_GIB[m], others, gb))
                else:
                    line(all(gb >= v for v in others.values()),
                         "2 %s: largest batch under %d GiB: gpumem %d >= %s (issue's reference: %s)"
                         % (m, CAP_GIB[m], gb, others, REFERENCE_MAX_BATCH[m]))
    # 3. the torch policy
    if "gpumem-torch" in allocators:
        for m in models:
            g, d = s[m]["gpumem-torch"], s[m].get("default")
            if m in FIXED_SHAPE:
                diff = s[m].get("memory_stats_diff")
                if diff is None:
                    line(None, "3 %s: memory_stats not compared (a run is missing)" % m)
                else:
                    desc = ", ".join("%s (default %s, gpumem-torch %s%s)" % (
                        k, v["default"], v["gpumem-torch"], ", differs between default runs" if v["differs_between_default_runs"] else "")
                        for k, v in list(diff.items())[:12])
                    more = " and %d more" % (len(diff) - 12) if len(diff) > 12 else ""
                    line(not diff, "3 %s: memory_stats equal to default's on %d keys%s" % (
                        m, s[m]["memory_stats_keys_compared"], "" if not diff else "; %d differ: %s%s" % (len(diff), desc, more)))
            if d and g["median_step_ms"] and d["median_step_ms"]:
                line(g["median_step_ms"] <= d["median_step_ms"], "3 %s: torch policy's median step %.2f ms <= default's %.2f ms (ratio %.3f)"
                     % (m, g["median_step_ms"], d["median_step_ms"], g["median_step_ms"] / d["median_step_ms"]))
    if not any(a in allocators for a in GPUMEM_POLICY):
        out.append("n/a   acceptance 1-3 compare the gpumem allocators with default: none was run")
    return out


def report(results, args, meta):
    models = [m for m in MODELS if any(r["model"] == m for r in results)]
    allocators = [a for a in ALLOCATORS if any(r["allocator"] == a for r in results)]
    s = summarize(results, models, allocators)
    md = table(s, models, allocators)
    acc = acceptance(s, models, allocators)
    return {"meta": meta, "summary": s, "table_md": md, "acceptance": acc, "results": results}


def write_out(path, doc):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    with open(os.path.splitext(path)[0] + ".md", "w") as f:
        f.write(doc["table_md"] + "\n\n" + "\n".join(doc["acceptance"]) + "\n")


def names(parser, text, known, what):
    """The comma-separated names in `text`, each one of `known`; an unknown one is a usage error."""
    out = [n.strip() for n in text.split(",") if n.strip()]
    for n in out:
        if n not in known:
            parser.error("unknown %s %r (choose from %s)" % (what, n, ",".join(known)))
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults fit issue 18's GPU budget: see docs/train-bench.md.")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from %s" % ",".join(MODELS))
    p.add_argument("--allocators", default=",".join(ALLOCATORS), help="comma-separated, from %s" % ",".join(ALLOCATORS))
    p.add_argument("--steps", type=int, default=100, help="measured steps per run (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps per run, not timed (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds: every allocator once per round (default 3)")
    p.add_argument("--max-batch-search", dest="max_batch", action="store_true", default=True,
                   help="search the largest batch under the cap for gpt2 and resnet50 (default)")
    p.add_argument("--no-max-batch", dest="max_batch", action="store_false")
    p.add_argument("--search-steps", type=int, default=3, help="full training steps per trial batch size (default 3)")
    p.add_argument("--search-max", type=int, default=4096, help="largest batch the search tries")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test, with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny model configs and inputs (for --device cpu)")
    p.add_argument("--out", default="bench-out/train_bench.json", help="JSON output (a .md with the table goes beside it)")
    p.add_argument("--workdir", help="children's JSON and logs (default: OUT without .json, plus .d)")
    p.add_argument("--prestart", type=int, default=2,
                   help="children started ahead, waiting before CUDA init, to hide process starts (0: none)")
    p.add_argument("--child-timeout", type=int, default=240, help="seconds a child may run after its go")
    p.add_argument("--prep-timeout", type=int, default=300, help="seconds a child may take to import and build")
    p.add_argument("--time-budget", type=float, default=540,
                   help="stop starting runs when the next one would end past this many seconds (0: none)")
    p.add_argument("--det-warn-only", action="store_true",
                   help="use_deterministic_algorithms(True, warn_only=True) instead of raising (beware: in warn-only "
                        "mode PyTorch's flash/memory-efficient attention keep their non-deterministic backward)")
    p.add_argument("--gpumem-option", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to gpumem.torch.enable(**options); VALUE parsed as JSON when it can be")
    p.add_argument("--skip-unavailable", action="store_true",
                   help="drop the gpumem allocators (with a note) if `import gpumem.torch` fails, instead of stopping")
    p.add_argument("--plan", action="store_true", help="print the plan and its estimated time, run nothing")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge the results of earlier invocations into --out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = names(p, args.models, MODELS, "model")
    # the canonical rotation order
    args.allocators = [a for a in ALLOCATORS if a in names(p, args.allocators, ALLOCATORS, "allocator")]
    opts = {}
    for kv in args.gpumem_option:
        k, _, v = kv.partition("=")
        try:
            opts[k] = json.loads(v)
        except ValueError:
            opts[k] = v
    args.gpumem_options = opts
    if args.workdir is None:
        args.workdir = os.path.splitext(args.out)[0] + ".d"
    return args


def main(argv):
    if argv[:1] == ["--child"]:
        return child_main(json.loads(argv[1]))
    args = parse_args(argv)
    t0 = time.time()
    if args.merge:
        results, metas = [], []
        for path in args.merge:
            with open(path) as f:
                doc = json.load(f)
            results += doc["results"]
            metas.append(doc["meta"])
        doc = report(results, args, {"merged": args.merge, "metas": metas})
        write_out(args.out, doc)
        print(doc["table_md"] + "\n\n" + "\n".join(doc["acceptance"]))
        return 0
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        print("note: PYTORCH_CUDA_ALLOC_CONF=%r is dropped in the children (each allocator sets its own)"
              % os.environ["PYTORCH_CUDA_ALLOC_CONF"])
    want_gpumem = [a for a in args.allocators if a in GPUMEM_POLICY]
    if want_gpumem and not args.plan:
        ok, why = check_gpumem_importable()
        if not ok:
            msg = ("`import gpumem.torch` fails here (%s). Install the gpumem wheel (see docs/train-bench.md), "
                   "or run without %s: --allocators default,expandable (or add --skip-unavailable)."
                   % (why, ",".join(want_gpumem)))
            if not args.skip_unavailable:
                print("train_bench.py: " + msg, file=sys.stderr)
                return 2
            print("note: " + msg + " Left out.")
            args.allocators = [a for a in args.allocators if a not in GPUMEM_POLICY]
    plan = make_plan(args)
    est = sum(estimate_s(i, args, hidden=args.prestart > 0) for i in plan)
    est_cold = sum(estimate_s(i, args, hidden=False) for i in plan)
    print("plan: %d children (%d training runs, %d cap searches); estimated %.0f s with prestarted children "
          "(%.0f s if every start showed, at %.0f s each); time budget %s"
          % (len(plan), sum(i["mode"] == "train" for i in plan), sum(i["mode"] == "search" for i in plan),
             est, est_cold, EST_START_S, "%.0f s" % args.time_budget if args.time_budget else "none"), flush=True)
    if args.time_budget and est > args.time_budget:
        print("warning: the plan is estimated past --time-budget %.0f s, so its last runs would be left out; "
              "split it (--models resnet50,gpt2 then --models vit,bert --no-max-batch, then --merge)"
              % args.time_budget, flush=True)
    if args.plan:
        for i in plan:
            print("  %-6s %-8s %-12s round %d  ~%.0f s" % (i["mode"], i["model"], i["allocator"], i["round"],
                                                           estimate_s(i, args, hidden=args.prestart > 0)))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    meta = {"argv": argv, "models": args.models, "allocators": args.allocators, "steps": args.steps,
            "warmup": args.warmup, "rounds": args.rounds, "device": args.device, "tiny": args.tiny,
            "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results = []

    def save():
        meta["elapsed_s"] = round(time.time() - t0, 1)
        write_out(args.out, report(results, args, meta))

    try:
        skipped = run_plan(args, plan, results, save)
    except KeyboardInterrupt:
        skipped = ["interrupted"]
    meta["skipped"] = skipped
    save()
    doc = report(results, args, meta)
    print()
    print(doc["table_md"])
    print()
    print("\n".join(doc["acceptance"]))
    failed = [r for r in results if not r.get("ok")]
    if failed:
        print("\n%d run(s) failed; their logs: %s" % (len(failed), ", ".join(r["log"] for r in failed)))
    if skipped:
        print("%d planned run(s) left out (time budget or interrupt)" % len(skipped))
    print("\nelapsed %.0f s; results in %s (table in %s)" % (time.time() - t0, args.out,
                                                             os.path.splitext(args.out)[0] + ".md"))
    return 0 if not failed and not skipped else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
