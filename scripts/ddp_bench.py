#!/usr/bin/env python3
"""ddp_bench.py: gpumem in every rank of a DistributedDataParallel job (issue 21).

Two modes.

Rank mode, one process per GPU under torchrun:
    torchrun --standalone --nproc_per_node=2 scripts/ddp_bench.py --allocator default|gpumem \
        --model gpt2|resnet50 [--steps 100 --warmup 10 --out DIR]
Each rank imports torch, calls gpumem.torch.enable(policy="gpumem") (allocator gpumem) BEFORE
torch.cuda.set_device(LOCAL_RANK), then init_process_group("nccl"), and trains with DDP:

  model     one step per rank
  gpt2      transformers GPT2LMHeadModel(GPT2Config()) (124M), batch 8 x 1024, bf16 autocast, AdamW
  resnet50  torchvision resnet50(weights=None), batch 64, fp32, SGD (lr 0.01, momentum 0.9)

(the models, optimizers and step are train_bench.py's, imported from it). Random weights from
seed 0 (the same on every rank), random data from seed 1 + rank (rank-dependent), deterministic
settings (use_deterministic_algorithms(True), CUBLAS_WORKSPACE_CONFIG=:4096:8, cudnn.benchmark
False). Each rank writes DIR/rank<R>.json: the median step time over --steps steps after
--warmup (torch.cuda.synchronize() ends each timed step), peak memory_allocated and
memory_reserved, the loss of every step as float.hex() and as a float, memory_stats() at the
end, the GPUs its gpumem has an allocator for, and, when --gpumem-bin is given, rank 0 runs
`gpumem info --json` once after warm-up (every rank waiting at a barrier, outside the timed
steps) so that the parent can check that each rank's process shows on its own GPU and no other.
With --log-dir each rank sends its stdout and stderr (file descriptors 1 and 2: NCCL's own
lines too) to DIR/rank<R>.log. Without torchrun (no RANK in the environment) it runs as the one
rank of a world of size 1.

Parent mode (--all): runs torchrun once per (model, allocator), every allocator once per round,
the order rotating from round to round, with NCCL_DEBUG=WARN in every launch, collects each
rank's JSON and log, and prints a table per model and rank and issue 21's acceptance lines:
  1. the losses of every step equal default's bit for bit, on every rank;
  2. per rank, peak reserved <= 1.02 x peak allocated, and median step <= 1.02 x default's;
  3. no NCCL/c10d error or warning line in the gpumem runs that default's runs do not print;
  4. each rank's gpumem holds memory on its own GPU only, and `gpumem info` lists every rank's
     process on its own GPU (when --gpumem-bin or .gpu/gpumem is there).

On the two-GPU machine (about 6 minutes; docs/ddp.md):
    PY=$(bash .gpu/gpu-install.sh .gpu) && \
    $PY scripts/ddp_bench.py --all --nproc 2 --gpumem-bin .gpu/gpumem --out $OUT/ddp
One GPU: --nproc 1 (or --world-size-1). Without a GPU (gloo, tiny models):
    python3 scripts/ddp_bench.py --all --nproc 2 --device cpu --tiny --steps 4 --warmup 1 \
        --rounds 2 --out /tmp/ddp-smoke
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ["gpt2", "resnet50"]
ALLOCATORS = ["default", "gpumem"]
# Issue 18's single-GPU step times on an H200 (ms), plus a margin for DDP's all-reduce; for the
# time estimate only. A launch costs torchrun's start, torch/transformers imports, CUDA and
# NCCL init in every rank, and the model's move to the GPU.
EST_STEP_MS = {"gpt2": 95.0, "resnet50": 42.0}
EST_LAUNCH_S = 25.0
GIB = 1 << 30

# train_bench.py (beside this script; it imports nothing but the standard library at the top):
# its Workload (models, batches, losses, optimizers) and the helpers both benches share
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import train_bench  # noqa: E402


# =============================================================================================
# Rank side: one process per GPU under torchrun.
# =============================================================================================

def redirect_output(path):
    """Sends file descriptors 1 and 2 to `path`: Python's prints, C++ warnings and NCCL's lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(args):
    if "RANK" not in os.environ:  # not under torchrun: the one rank of a world of size 1
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    os.makedirs(args.out, exist_ok=True)
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        redirect_output(os.path.join(args.log_dir, "rank%d.log" % rank))
    cuda = args.device == "cuda"
    if args.allocator == "gpumem" and not cuda:
        print("ddp_bench.py: the gpumem allocator is a CUDA allocator and cannot run with --device cpu "
              "(use --allocator default, or the parent's --cpu-standin to test the comparison)", file=sys.stderr)
        return 2
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    spec = {"out": os.path.join(args.out, "rank%d.json" % rank), "allocator": args.allocator,
            "model": args.model, "device": args.device, "tiny": args.tiny, "steps": args.steps,
            "warmup": args.warmup, "rank": rank, "local_rank": local_rank, "world_size": world,
            "label": args.label or args.allocator}
    res = train_bench.ChildResult(spec)
    d = res.d
    d.update(pid=os.getpid(), rank=rank, local_rank=local_rank, world_size=world, host=socket.gethostname())
    t_start = time.perf_counter()
    dist = None
    try:
        d["phase"] = "import"
        res.flush()
        import torch
        if args.allocator == "gpumem":
            try:
                import gpumem.torch
            except Exception as e:
                raise RuntimeError("ddp_bench: `import gpumem.torch` failed (%s: %s); install the gpumem wheel "
                                   "(bash .gpu/gpu-install.sh .gpu prints the Python that has it)"
                                   % (type(e).__name__, e))
            # before torch.cuda.set_device and init_process_group: one gpumem allocator per GPU
            gpumem.torch.enable(policy="gpumem")
            d["gpumem_policy"] = gpumem.torch.policy()
            if torch.cuda.is_initialized():
                raise RuntimeError("CUDA was initialized by gpumem.torch.enable()")
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        d["torch_version"] = torch.__version__
        d["cublas_workspace_config"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")
        d["nccl_debug"] = os.environ.get("NCCL_DEBUG", "")
        d["times"]["import_s"] = time.perf_counter() - t_start

        d["phase"] = "init"
        if cuda:
            torch.cuda.set_device(local_rank)
            device = "cuda:%d" % local_rank
        else:
            device = "cpu"
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend)
        d["backend"] = backend
        if cuda:
            try:
                d["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
            except Exception as e:
                d["nccl_version"] = "? (%s)" % e
            d["device_name"] = torch.cuda.get_device_name(local_rank)
            try:
                d["device_uuid"] = str(torch.cuda.get_device_properties(local_rank).uuid)
            except Exception as e:
                d["device_uuid"] = None
                d["device_uuid_error"] = str(e)
            try:
                d["allocator_backend"] = torch.cuda.memory.get_allocator_backend()
            except Exception as e:
                d["allocator_backend"] = "? (%s)" % e
        d["times"]["init_s"] = time.perf_counter() - t_start

        d["phase"] = "build"
        import random
        random.seed(0)
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        torch.use_deterministic_algorithms(True, warn_only=args.det_warn_only)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        wl = train_bench.Workload(args.model, args.tiny, torch, device)
        d["model_impl"] = wl.impl
        d["params"] = sum(p.numel() for p in wl.model.parameters())
        model = wl.model.to(device)
        model.train()
        ddp = DDP(model, device_ids=[local_rank] if cuda else None)
        opt = wl.optimizer(ddp)
        torch.manual_seed(1 + rank)  # rank-dependent data (and dropout), the same for every allocator
        d["batch"] = wl.batch
        d["times"]["build_s"] = time.perf_counter() - t_start
        run_steps(args, d, res, torch, dist, wl, ddp, opt, cuda, rank, local_rank)
        d["ok"] = not d["errors"]
        d["phase"] = "done"
        return 0
    except BaseException as e:
        d["errors"].append("%s: %s\n%s" % (type(e).__name__, e, traceback.format_exc()[-4000:]))
        print("ddp_bench.py rank %d: %s: %s" % (rank, type(e).__name__, e), file=sys.stderr)
        return 1
    finally:
        d["times"]["total_s"] = time.perf_counter() - t_start
        res.flush()
        if dist is not None and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:
                d["errors"].append("destroy_process_group: %s" % e)
                res.flush()


def barrier(dist, cuda, local_rank):
    if cuda:
        dist.barrier(device_ids=[local_rank])
    else:
        dist.barrier()


def run_steps(args, d, res, torch, dist, wl, ddp, opt, cuda, rank, local_rank):
    train_step = train_bench.train_step
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = args.warmup + args.steps
    d.update(step_ms=[], losses_hex=[], losses=[])
    d["driver_used_max"] = None
    barrier(dist, cuda, local_rank)
    d["phase"] = "steps"
    for i in range(n):
        sync()
        t0 = time.perf_counter()
        inputs = wl.make_batch(wl.batch)
        loss = train_step(wl, ddp, opt, None, inputs)
        sync()
        dt = time.perf_counter() - t0
        v = loss.item()  # outside the timed region
        d["step_ms"].append(dt * 1e3)
        d["losses_hex"].append(float(v).hex())
        d["losses"].append(v)
        del loss, inputs
        if cuda:
            free, total = torch.cuda.mem_get_info()
            d["driver_used_max"] = max(total - free, d["driver_used_max"] or 0)
        if i == args.warmup - 1:
            res.flush()
            at_info(args, d, torch, dist, cuda, rank, local_rank)
        elif (i + 1) % 25 == 0:
            res.flush()
    d["nonfinite_losses"] = sum(1 for v in d["losses"] if v != v or v in (float("inf"), float("-inf")))
    measured = d["step_ms"][args.warmup:]
    d["median_step_ms"] = statistics.median(measured) if measured else None
    if cuda:
        d["peak_allocated"] = torch.cuda.max_memory_allocated()
        d["peak_reserved"] = torch.cuda.max_memory_reserved()
        d["end_allocated"] = torch.cuda.memory_allocated()
        d["end_reserved"] = torch.cuda.memory_reserved()
        d["memory_stats"] = dict(torch.cuda.memory_stats())
        if args.allocator == "gpumem":
            import gpumem.torch
            # one allocator per GPU: this rank's gpumem should hold memory on its own GPU only
            d["gpumem_devices"] = [i for i in range(torch.cuda.device_count())
                                   if gpumem.torch.allocator(i) is not None]


def at_info(args, d, torch, dist, cuda, rank, local_rank):
    """After warm-up, every rank at a barrier: what each holds, and `gpumem info` from rank 0."""
    if cuda:
        free, total = torch.cuda.mem_get_info()
        d["at_info"] = {"pid": os.getpid(), "allocated": torch.cuda.memory_allocated(),
                        "reserved": torch.cuda.memory_reserved(), "driver_used": total - free}
    if not args.gpumem_bin:
        return
    barrier(dist, cuda, local_rank)
    if rank == 0:
        try:
            p = subprocess.run([args.gpumem_bin, "info", "--json"], capture_output=True, text=True, timeout=60)
            d["gpumem_info_rc"] = p.returncode
            d["gpumem_info_stderr"] = p.stderr[-2000:]
            if p.returncode == 0:
                d["gpumem_info"] = json.loads(p.stdout)
            else:
                d["gpumem_info_stdout"] = p.stdout[-2000:]
        except Exception as e:
            d["gpumem_info_error"] = "%s: %s" % (type(e).__name__, e)
    barrier(dist, cuda, local_rank)


# =============================================================================================
# Parent side: one torchrun per (model, allocator, round), then the table and acceptance.
# =============================================================================================

def make_plan(args):
    return [{"model": m, "allocator": a, "round": r}
            for r in range(args.rounds) for m in args.models for a in train_bench.rotate(args.allocators, r)]


def estimate_s(item, args):
    return EST_LAUNCH_S + (args.warmup + args.steps) * EST_STEP_MS[item["model"]] / 1e3


def launch_env(args):
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    env["PYTHONHASHSEED"] = "0"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["NCCL_DEBUG"] = args.nccl_debug  # the same in every launch, so their lines compare
    # torchrun warns when it sets OMP_NUM_THREADS itself; set it so that line is not in the logs
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    return env


def run_launch(item, args, idx):
    tag = "%03d-%s-%s-r%d" % (idx, item["model"], item["allocator"], item["round"])
    wd = os.path.join(args.out, tag)
    if os.path.isdir(wd):
        shutil.rmtree(wd)
    os.makedirs(wd)
    real_alloc = "default" if item["allocator"] == "gpumem" and args.cpu_standin else item["allocator"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           os.path.abspath(__file__), "--allocator", real_alloc, "--label", item["allocator"],
           "--model", item["model"], "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--out", wd, "--log-dir", wd]
    if args.tiny:
        cmd.append("--tiny")
    if args.det_warn_only:
        cmd.append("--det-warn-only")
    if args.gpumem_bin:
        cmd += ["--gpumem-bin", args.gpumem_bin]
    t0 = time.time()
    note = None
    with open(os.path.join(wd, "launcher.log"), "w") as log:
        log.write("$ %s\n" % " ".join(cmd))
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=launch_env(args), start_new_session=True)
        try:
            p.wait(timeout=args.launch_timeout)
        except subprocess.TimeoutExpired:
            note = "killed after --launch-timeout %d s" % args.launch_timeout
            os.killpg(p.pid, signal.SIGKILL)  # torchrun and its ranks: the group started here
            p.wait()
    wall = time.time() - t0
    ranks = []
    for r in range(args.nproc):
        path = os.path.join(wd, "rank%d.json" % r)
        try:
            with open(path) as f:
                x = json.load(f)
        except (OSError, ValueError) as e:
            x = {"ok": False, "errors": ["no JSON from rank %d (%s)" % (r, e)], "rank": r}
        x.setdefault("rank", r)
        x.setdefault("errors", [])
        if note:
            x["errors"].append(note)
            x["ok"] = False
        x["log"] = os.path.join(wd, "rank%d.log" % r)
        ranks.append(x)
    return {"tag": tag, "dir": wd, "model": item["model"], "allocator": item["allocator"], "round": item["round"],
            "returncode": p.returncode, "wall_s": round(wall, 1), "ranks": ranks,
            "standin": item["allocator"] == "gpumem" and bool(args.cpu_standin),
            "ok": p.returncode == 0 and not note and all(x.get("ok") for x in ranks)}


def one_line(L, elapsed):
    s = "[%5.0f s] %-8s %-8s round %d (%.0f s):" % (elapsed, L["model"], L["allocator"], L["round"], L["wall_s"])
    for x in L["ranks"]:
        s += "  rank %d " % x["rank"]
        if x.get("median_step_ms") is not None:
            s += "%.2f ms" % x["median_step_ms"]
            if x.get("peak_reserved"):
                s += " %.3f/%.3f GiB" % (x["peak_reserved"] / GIB, x["peak_allocated"] / GIB)
        if not x.get("ok"):
            s += " FAILED: " + (x["errors"][0].splitlines()[0][:160] if x.get("errors") else "?")
    if L["returncode"] not in (0, None):
        s += "  (torchrun exited %s; see %s)" % (L["returncode"], os.path.join(L["dir"], "launcher.log"))
    return s


# ------------------------------------------------------------------ NCCL lines ---

# A line that reports an error or a warning from NCCL, c10d/ProcessGroup, the launcher or Python.
FLAG_RE = re.compile(r"\b(warn\w*|error\w*|fail\w*|abort\w*|timed? ?out|exception|traceback)\b", re.I)
NOISE_RE = [(re.compile(r"0x[0-9a-fA-F]+"), "0x#"), (re.compile(r"\d+(\.\d+)?"), "#"),
            (re.compile(r"/tmp/\S+"), "/tmp/*"), (re.compile(r"\s+"), " ")]


def normalize(line, host):
    if host:
        line = line.replace(host, "HOST")
    for rx, rep in NOISE_RE:
        line = rx.sub(rep, line)
    return line.strip()


def flagged_lines(L):
    """The error/warning lines of a launch (its ranks' logs and torchrun's), normalized: numbers,
    addresses, host and temporary paths taken out, so the same message compares equal."""
    out = {}
    host = next((x.get("host") for x in L["ranks"] if x.get("host")), None)
    files = [(x["rank"], x["log"]) for x in L["ranks"]] + [("launcher", os.path.join(L["dir"], "launcher.log"))]
    for who, path in files:
        try:
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for ln in lines:
            if ln.startswith("$ ") or not FLAG_RE.search(ln):
                continue
            out.setdefault(normalize(ln, host), []).append((who, ln.strip()[:300]))
    return out


# ------------------------------------------------------------------ summary and acceptance ---

def summarize(launches, models, allocators, nproc):
    s = {}
    for m in models:
        s[m] = {}
        by = {a: [L for L in launches if L["model"] == m and L["allocator"] == a] for a in allocators}
        for r in range(nproc):
            s[m][r] = {}
            ref = next((L["ranks"][r] for L in by.get("default", []) if L["ranks"][r].get("losses_hex")), None)
            for a in allocators:
                runs = [L["ranks"][r] for L in by[a]]
                ok = [x for x in runs if x.get("ok")]
                e = {"runs": len(runs), "ok_runs": len(ok),
                     "errors": [x["errors"][0].splitlines()[0] for x in runs if x.get("errors")]}
                e["round_medians_ms"] = [x["median_step_ms"] for x in ok if x.get("median_step_ms") is not None]
                e["median_step_ms"] = train_bench.med(e["round_medians_ms"])
                e["peak_reserved"] = train_bench.med([x.get("peak_reserved") for x in ok])
                e["peak_allocated"] = train_bench.med([x.get("peak_allocated") for x in ok])
                ratios = [x["peak_reserved"] / x["peak_allocated"] for x in ok if x.get("peak_allocated")]
                e["reserved_over_allocated"] = train_bench.med(ratios)
                e["reserved_over_allocated_max"] = max(ratios) if ratios else None
                e["driver_used_max"] = train_bench.med([x.get("driver_used_max") for x in ok])
                e["nonfinite_losses"] = max([x.get("nonfinite_losses", 0) for x in ok] or [0])
                e["gpumem_devices"] = [x.get("gpumem_devices") for x in ok if "gpumem_devices" in x]
                if ref is None:
                    e["losses_identical"] = None
                else:
                    diffs = []
                    for L, x in zip(by[a], runs):
                        if x is ref:
                            continue
                        fd = train_bench.first_diff(ref["losses_hex"], x.get("losses_hex") or [])
                        if fd is not None:
                            diffs.append({"round": L["round"], "first_diff_step": fd})
                    e["losses_identical"] = not diffs and bool(runs)
                    e["loss_diffs"] = diffs
                s[m][r][a] = e
            dm = s[m][r].get("default", {}).get("median_step_ms")
            for a in allocators:
                am = s[m][r][a]["median_step_ms"]
                s[m][r][a]["ratio_to_default"] = am / dm if dm and am else None
        # NCCL and other error/warning lines: those of the gpumem runs that no default run printed
        if "default" in allocators:
            dflt = set()
            for L in by["default"]:
                dflt |= set(flagged_lines(L))
            new = {}
            for a in allocators:
                if a == "default":
                    continue
                for L in by[a]:
                    for k, v in flagged_lines(L).items():
                        if k not in dflt:
                            new.setdefault(k, {"allocator": a, "round": L["round"], "where": v[0][0], "line": v[0][1]})
            s[m]["new_lines"] = list(new.values())
            s[m]["default_flagged_lines"] = len(dflt)
    return s


def info_check(launches):
    """`gpumem info` (run by rank 0 after warm-up): is each rank's pid listed on its own GPU, and
    on no other? The GPU is matched by UUID when both sides have it, else by index."""
    out = []
    for L in launches:
        r0 = L["ranks"][0] if L["ranks"] else {}
        info = r0.get("gpumem_info")
        if info is None:
            if r0.get("gpumem_info_rc") is not None or r0.get("gpumem_info_error"):
                out.append({"tag": L["tag"], "ok": False, "text": "gpumem info failed: rc %s %s" % (
                    r0.get("gpumem_info_rc"), (r0.get("gpumem_info_error") or r0.get("gpumem_info_stderr") or "").strip()[:200])})
            continue
        gpus = info.get("gpus", [])
        pids_listed = {p["pid"] for g in gpus for p in g.get("processes", [])}
        rows, ok, visible = [], True, False
        for x in L["ranks"]:
            a = x.get("at_info") or {}
            pid = a.get("pid", x.get("pid"))
            where = [g for g in gpus if any(p["pid"] == pid for p in g.get("processes", []))]
            if where:
                visible = True
            uuid = x.get("device_uuid")

            def mine(g):
                if uuid and g.get("uuid"):
                    return g["uuid"].replace("GPU-", "") == str(uuid).replace("GPU-", "")
                return g.get("index") == x.get("local_rank")
            held = {g["index"]: next(p.get("used_bytes") for p in g["processes"] if p["pid"] == pid) for g in where}
            good = len(where) == 1 and mine(where[0])
            ok = ok and good
            rows.append("rank %d pid %s: listed on GPU %s (driver: %s), reserved by the allocator %s" % (
                x.get("rank", -1), pid, sorted(held) or "none",
                ", ".join("%s MiB" % (b >> 20 if b is not None else "?") for b in held.values()) or "-",
                "%.0f MiB" % (a["reserved"] / (1 << 20)) if a.get("reserved") is not None else "?"))
        if not visible:
            out.append({"tag": L["tag"], "ok": None, "text": "no rank's pid is among NVML's (%s): a PID namespace "
                        "hides them; by count, %d process(es) listed for %d ranks" % (
                            sorted(pids_listed), len(pids_listed), len(L["ranks"]))})
        else:
            out.append({"tag": L["tag"], "ok": ok, "text": "; ".join(rows)})
    return out


def table(s, models, allocators, nproc):
    lines = ["| model | rank | allocator | median step ms (round medians) | / default | peak reserved GiB | "
             "peak allocated GiB | reserved/allocated | driver used max GiB | losses = default |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        for r in range(nproc):
            for a in allocators:
                e = s[m][r][a]
                if e["median_step_ms"] is None:
                    err = e["errors"][0] if e["errors"] else "not run"
                    lines.append("| %s | %d | %s | failed: %s | | | | | | |" % (m, r, a, err[:120]))
                    continue
                li = e.get("losses_identical")
                if a == "default" and li is not None:
                    lid = "reference" + ("" if li else " (runs differ: step %s)" % [d["first_diff_step"] for d in e["loss_diffs"]])
                elif li is None:
                    lid = "-"
                else:
                    lid = "yes" if li else "no, step %s" % min(d["first_diff_step"] for d in e["loss_diffs"])
                lines.append("| %s | %d | %s | %.2f (%s) | %s | %s | %s | %s | %s | %s |" % (
                    m, r, a, e["median_step_ms"], ", ".join("%.1f" % v for v in e["round_medians_ms"]),
                    "%.3f" % e["ratio_to_default"] if e["ratio_to_default"] else "-",
                    train_bench.fmt_gib(e["peak_reserved"]), train_bench.fmt_gib(e["peak_allocated"]),
                    "%.4f" % e["reserved_over_allocated"] if e["reserved_over_allocated"] else "-",
                    train_bench.fmt_gib(e["driver_used_max"]), lid))
    return "\n".join(lines)


def acceptance(s, launches, models, allocators, nproc, standin):
    out = []

    def line(ok, text):
        out.append("%s  %s" % ("n/a " if ok is None else ("PASS" if ok else "FAIL"), text))

    others = [a for a in allocators if a != "default"]
    tag = " (CPU stand-in: PyTorch's CPU allocator under the name gpumem, checks the comparison only)" if standin else ""
    if "default" not in allocators:
        out.append("n/a   every check compares with PyTorch's default allocator, which was not run")
    for m in models:
        for r in range(nproc):
            d = s[m][r].get("default")
            if d and d.get("nonfinite_losses"):
                line(False, "1 %s rank %d: default's losses are not all finite (%d)" % (m, r, d["nonfinite_losses"]))
            if d and d.get("losses_identical") is False:
                line(False, "1 %s rank %d: two default runs differ (steps %s): the run is not deterministic"
                     % (m, r, [x["first_diff_step"] for x in d["loss_diffs"]]))
            elif d and d.get("losses_identical") and d["runs"] > 1:
                line(True, "1 %s rank %d: default's losses reproduce bit for bit over %d runs" % (m, r, d["runs"]))
            for a in others:
                e = s[m][r][a]
                if d is None or e.get("losses_identical") is None or not e["runs"]:
                    line(None, "1 %s rank %d %s: no losses to compare" % (m, r, a))
                    continue
                li = e["losses_identical"]
                line(li, "1 %s rank %d %s: losses bit-identical to default's in %d/%d runs%s%s" % (
                    m, r, a, e["runs"] - len(e["loss_diffs"]), e["runs"],
                    "" if li else "; first differing step %s" % min(x["first_diff_step"] for x in e["loss_diffs"]), tag))
    for m in models:
        for r in range(nproc):
            d = s[m][r].get("default")
            for a in others:
                e = s[m][r][a]
                ro = e["reserved_over_allocated"]
                if ro is None:
                    line(None, "2 %s rank %d %s: peak reserved / allocated not measured (no CUDA)" % (m, r, a))
                else:
                    line(ro <= 1.02, "2 %s rank %d %s: peak reserved / allocated %.4f (max over runs %.4f) <= 1.02 "
                         "(default's %s)" % (m, r, a, ro, e["reserved_over_allocated_max"],
                                            "%.4f" % d["reserved_over_allocated"] if d and d["reserved_over_allocated"] else "-"))
                if d and e["median_step_ms"] and d["median_step_ms"]:
                    q = e["median_step_ms"] / d["median_step_ms"]
                    line(q <= 1.02, "2 %s rank %d %s: median step %.2f ms <= 1.02 x default's %.2f ms (ratio %.3f; "
                         "round medians %s vs %s)%s" % (m, r, a, e["median_step_ms"], d["median_step_ms"], q,
                                                       ["%.1f" % v for v in e["round_medians_ms"]],
                                                       ["%.1f" % v for v in d["round_medians_ms"]], tag))
                else:
                    line(None, "2 %s rank %d %s: step time not compared (a run is missing)" % (m, r, a))
    for m in models:
        if "new_lines" not in s[m] or not others:
            continue
        new = s[m]["new_lines"]
        if not new:
            line(True, "3 %s: no NCCL/c10d error or warning line in the %s runs that default's runs do not print "
                 "(default's runs print %d distinct such lines)" % (m, "/".join(others), s[m]["default_flagged_lines"]))
        else:
            line(False, "3 %s: %d error/warning line(s) only in %s runs, first: [%s, round %d, %s] %s" % (
                m, len(new), "/".join(sorted({x["allocator"] for x in new})), new[0]["allocator"], new[0]["round"],
                "rank %s" % new[0]["where"] if new[0]["where"] != "launcher" else "torchrun", new[0]["line"][:200]))
    for m in models:
        for r in range(nproc):
            for a in others:
                devs = s[m][r][a]["gpumem_devices"]
                if devs:
                    good = all(v == [r % max(1, nproc)] for v in devs)
                    line(good, "4 %s rank %d %s: this rank's gpumem has allocators for GPU(s) %s over its runs "
                         "(expected its own GPU only: [%d])" % (m, r, a, sorted({tuple(v) for v in devs}), r))
    checks = info_check(launches)
    for c in checks:
        line(c["ok"], "4 %s: gpumem info: %s" % (c["tag"], c["text"]))
    if not checks and any(a == "gpumem" for a in allocators) and not standin:
        line(None, "4 gpumem info not run (give --gpumem-bin, or build .gpu/gpumem)")
    return out


def report(launches, args, meta):
    models = [m for m in MODELS if any(L["model"] == m for L in launches)]
    allocators = [a for a in ALLOCATORS if any(L["allocator"] == a for L in launches)]
    s = summarize(launches, models, allocators, args.nproc)
    md = table(s, models, allocators, args.nproc)
    acc = acceptance(s, launches, models, allocators, args.nproc, args.cpu_standin)
    return {"meta": meta, "summary": s, "table_md": md, "acceptance": acc, "launches": launches}


def write_out(out_dir, doc):
    path = os.path.join(out_dir, "ddp_bench.json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "ddp_bench.md"), "w") as f:
        f.write(doc["table_md"] + "\n\n" + "\n".join(doc["acceptance"]) + "\n")


def report_main(args, argv):
    """Re-reads earlier parent runs (each DIR holds ddp_bench.json and one folder per launch, as it
    came back from the GPU machine) and writes their joint table and acceptance lines to --out."""
    launches, metas = [], []
    for d in args.report:
        with open(os.path.join(d, "ddp_bench.json")) as f:
            doc = json.load(f)
        metas.append(doc["meta"])
        for L in doc["launches"]:
            L["dir"] = os.path.join(d, L["tag"])  # the paths of the machine it ran on, made local
            for x in L["ranks"]:
                x["log"] = os.path.join(L["dir"], "rank%d.log" % x["rank"])
            launches.append(L)
    nprocs = {m.get("nproc") for m in metas}
    if len(nprocs) != 1:
        print("ddp_bench.py: the runs have different --nproc (%s)" % sorted(nprocs), file=sys.stderr)
        return 2
    args.nproc = nprocs.pop()
    args.cpu_standin = any(m.get("cpu_standin") for m in metas)
    os.makedirs(args.out, exist_ok=True)
    doc = report(launches, args, {"merged": args.report, "metas": metas})
    write_out(args.out, doc)
    print(doc["table_md"] + "\n\n" + "\n".join(doc["acceptance"]))
    return 0


def parent_main(args, argv):
    t0 = time.time()
    if args.device == "cpu" and "gpumem" in args.allocators and not args.cpu_standin:
        print("note: the gpumem allocator is a CUDA allocator: left out with --device cpu "
              "(--cpu-standin runs PyTorch's CPU allocator in its place, to test the comparison)")
        args.allocators = [a for a in args.allocators if a != "gpumem"]
    if args.device == "cuda" and "gpumem" in args.allocators and not args.plan:
        p = subprocess.run([sys.executable, "-c", "import torch, gpumem.torch"], capture_output=True, text=True)
        if p.returncode != 0:
            print("ddp_bench.py: `import gpumem.torch` fails here (%s); install the wheel (bash .gpu/gpu-install.sh .gpu "
                  "prints the Python to use) or run --allocators default"
                  % (p.stderr.strip().splitlines() or ["?"])[-1], file=sys.stderr)
            return 2
    if args.gpumem_bin is None and args.device == "cuda":
        for cand in (os.path.join(HERE, "..", ".gpu", "gpumem"), shutil.which("gpumem")):
            if cand and os.access(cand, os.X_OK):
                args.gpumem_bin = os.path.abspath(cand)
                break
    if args.gpumem_bin:
        args.gpumem_bin = os.path.abspath(args.gpumem_bin)
    plan = make_plan(args)
    est = sum(estimate_s(i, args) for i in plan)
    print("plan: %d torchrun launches of %d rank(s) (%s x %s x %d rounds), estimated %.0f s at %.0f s per launch "
          "plus the steps; time budget %s; gpumem info: %s"
          % (len(plan), args.nproc, ",".join(args.models), ",".join(args.allocators), args.rounds, est, EST_LAUNCH_S,
             "%.0f s" % args.time_budget if args.time_budget else "none", args.gpumem_bin or "not run"), flush=True)
    if args.plan:
        for i in plan:
            print("  %-8s %-8s round %d  ~%.0f s" % (i["model"], i["allocator"], i["round"], estimate_s(i, args)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    meta = {"argv": argv, "nproc": args.nproc, "models": args.models, "allocators": args.allocators,
            "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "device": args.device,
            "tiny": args.tiny, "cpu_standin": args.cpu_standin, "nccl_debug": args.nccl_debug,
            "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    launches, skipped, seen = [], [], {}
    pending = list(plan)
    try:
        while pending:
            item = pending[0]
            elapsed = time.time() - t0
            # the estimate, or what this model's last launch really took if that was longer
            est = max(estimate_s(item, args), seen.get(item["model"], 0))
            if args.time_budget and elapsed + est > args.time_budget:
                skipped = pending
                print("time budget: %.0f s spent, %d launches left out" % (elapsed, len(skipped)), flush=True)
                break
            pending.pop(0)
            L = run_launch(item, args, len(launches))
            seen[item["model"]] = L["wall_s"]
            launches.append(L)
            print(one_line(L, time.time() - t0), flush=True)
            meta["elapsed_s"] = round(time.time() - t0, 1)
            write_out(args.out, report(launches, args, meta))
    except KeyboardInterrupt:
        skipped = pending or ["interrupted"]
    meta["skipped"] = [dict(i) for i in skipped if isinstance(i, dict)]
    meta["elapsed_s"] = round(time.time() - t0, 1)
    doc = report(launches, args, meta)
    write_out(args.out, doc)
    print()
    print(doc["table_md"])
    print()
    print("\n".join(doc["acceptance"]))
    failed = [L for L in launches if not L["ok"]]
    if failed:
        print("\n%d launch(es) failed; logs in %s" % (len(failed), ", ".join(L["dir"] for L in failed)))
    if skipped:
        print("%d planned launch(es) left out (time budget or interrupt)" % len(skipped))
    print("\nelapsed %.0f s; results in %s (table in %s)" % (time.time() - t0, os.path.join(args.out, "ddp_bench.json"),
                                                             os.path.join(args.out, "ddp_bench.md")))
    return 0 if not failed and not skipped else 1


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/ddp.md.")
    p.add_argument("--all", action="store_true", help="parent mode: run torchrun per (model, allocator, round)")
    p.add_argument("--allocator", choices=ALLOCATORS, help="rank mode: the allocator of this launch")
    p.add_argument("--model", choices=MODELS, help="rank mode: the model of this launch")
    p.add_argument("--models", default=",".join(MODELS), help="parent mode: comma-separated, from %s" % ",".join(MODELS))
    p.add_argument("--allocators", default=",".join(ALLOCATORS), help="parent mode: comma-separated, from %s"
                   % ",".join(ALLOCATORS))
    p.add_argument("--nproc", type=int, default=2, help="parent mode: ranks per launch, one per GPU (default 2)")
    p.add_argument("--world-size-1", action="store_true", help="parent mode: the same as --nproc 1 (one GPU)")
    p.add_argument("--rounds", type=int, default=3, help="parent mode: every allocator once per round (default 3)")
    p.add_argument("--steps", type=int, default=100, help="measured steps (default 100)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps, not timed (default 10)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda (NCCL), or cpu (gloo, with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny model configs and inputs (for --device cpu)")
    p.add_argument("--cpu-standin", action="store_true",
                   help="parent mode, --device cpu: run PyTorch's CPU allocator under the name gpumem, to test "
                        "the comparison and acceptance lines without a GPU")
    p.add_argument("--out", help="rank mode: the folder for rank<R>.json (default ddp-out); parent mode: the "
                   "results folder (default bench-out/ddp)")
    p.add_argument("--log-dir", help="rank mode: send each rank's stdout and stderr to LOG_DIR/rank<R>.log")
    p.add_argument("--label", help=argparse.SUPPRESS)
    p.add_argument("--gpumem-bin", help="the gpumem CLI, for `gpumem info --json` after warm-up (parent mode "
                   "default: .gpu/gpumem or gpumem on PATH, if there)")
    p.add_argument("--nccl-debug", default="WARN", help="parent mode: NCCL_DEBUG in every launch (default WARN)")
    p.add_argument("--det-warn-only", action="store_true", help="use_deterministic_algorithms(True, warn_only=True)")
    p.add_argument("--launch-timeout", type=int, default=240, help="parent mode: seconds one torchrun may take")
    p.add_argument("--time-budget", type=float, default=520,
                   help="parent mode: start no launch that would end past this many seconds (0: none)")
    p.add_argument("--plan", action="store_true", help="parent mode: print the plan and its estimate only")
    p.add_argument("--report", nargs="+", metavar="DIR",
                   help="re-read the results folders of earlier parent runs and write their joint table to --out")
    args = p.parse_args(argv)
    if args.world_size_1:
        args.nproc = 1
    if args.report:
        args.out = args.out or "bench-out/ddp-report"
        return args
    if args.all:
        args.models = train_bench.names(p, args.models, MODELS, "model")
        args.allocators = [a for a in ALLOCATORS if a in train_bench.names(p, args.allocators, ALLOCATORS, "allocator")]
        if args.cpu_standin and args.device != "cpu":
            p.error("--cpu-standin is for --device cpu only")
        args.out = args.out or "bench-out/ddp"
    else:
        if not args.allocator or not args.model:
            p.error("rank mode needs --allocator and --model (or use --all for the parent mode)")
        args.out = args.out or "ddp-out"
    return args


def main(argv):
    args = parse_args(argv)
    if args.report:
        return report_main(args, argv)
    if args.all:
        return parent_main(args, argv)
    return rank_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
