#!/usr/bin/env python3
"""torch_memory_tests.py: PyTorch's own memory tests, run under gpumem's plugin (issue 18, acceptance 6).

What it does. It runs a chosen set of the memory tests of PyTorch's test/test_cuda.py in a process
where `gpumem.torch.enable(policy="torch")` was called before anything initialized CUDA, and, for
comparison, in a process with PyTorch's own allocator (mode `default`), so the tests that fail on
the GPU machine anyway (newer test file, missing hardware or tools) are told apart from those that
fail because of gpumem. It writes, per mode, pass / fail / error / skip / crash / timeout for every
test and the first line of each failure, to OUTDIR/results.json and OUTDIR/results.txt.

Why this shape. The test file is PyTorch's, not ours: it is carried to the GPU machine in the
git-ignored folder .gpu-extra/ (fetched from pytorch/pytorch, see docs/train-bench.md) and is never
edited. Each mode runs in a child process; a test that crashes the process (a plugin can) or hangs
(faulthandler ends it after --test-timeout, 45 s) is recorded, and a fresh child goes on with the
tests that are left. A mode gets --mode-timeout (85 s), so two modes stay under 3 minutes; tests
left then are reported "not run". Tests run through unittest (pytest is not needed on the GPU machine).

Patches. The test file is not modified; what it needs from torch 2.11 is shimmed here, before it
is imported:
  1. TEST_CUDAMALLOCASYNC. The fetched test_cuda.py (pytorch main, commit 000e43cd, newer than 2.11)
     imports it from torch.testing._internal.common_utils, which in torch 2.11 does not define it
     (older test files computed it themselves). The shim sets common_utils.TEST_CUDAMALLOCASYNC to
     whether PYTORCH_CUDA_ALLOC_CONF selects backend:cudaMallocAsync: False in every mode here.
     (Read from the environment, not from torch.cuda.get_allocator_backend(), to touch no CUDA state.)
  2. psutil. Imported at the top of the file, used only by TestGDS (not selected). When it is not
     installed, the wheel in .gpu-extra/wheels is installed offline if pip can, else a stub module
     is put in sys.modules.
  3. expecttest. torch.testing._internal.common_utils imports it (a test-only dependency that the
     torch wheel does not install). When missing, the wheel in .gpu-extra/wheels is put on sys.path
     (pure Python, importable from the zip), else a stub (TestCase = unittest.TestCase, ACCEPT = False).
  4. sys.argv is reset to the script name before the import: common_utils parses the command line
     at import time.
Known version gaps (tests, not patches): none of the selected tests needs an API that torch 2.11
lacks (checked against the 2.11 wheel: torch.accelerator.memory_*, get_per_process_memory_fraction,
_set_memory_metadata, _record_memory_history(skip_actions=...), _accelerator_setAllocatorSettings
all exist). The file has no memory_summary test; the runner's own check `runner.memory_summary`
calls torch.cuda.memory_summary() and torch.cuda.memory_stats() once at the end.

Usage on the GPU machine (about 1-2 minutes per mode):
    python3 scripts/torch_memory_tests.py --modes default,gpumem-torch --out tmt-out
    python3 scripts/torch_memory_tests.py --list              # the selected test ids, runs nothing
    python3 scripts/torch_memory_tests.py -k test_memory_snapshot -k test_raises_oom --modes gpumem-torch
"""

import argparse
import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_TEST_FILE = os.path.join(ROOT, ".gpu-extra", "test_cuda.py")
WHEELS = os.path.join(ROOT, ".gpu-extra", "wheels")
SOURCE = "pytorch/pytorch test/test_cuda.py at commit 000e43cdff99f30291164c1f2e90133f19fa83fb (313,414 characters)"
MODES = {"default": None, "gpumem-torch": "torch", "gpumem": "gpumem"}

# The memory tests chosen from test_cuda.py (read from the file), by area. Ids are Class.method;
# a `*` matches the parametrized variants.
DEFAULT_TESTS = [
    # statistics: memory_allocated/reserved and peaks, memory_stats keys, reset_peak, accelerator.*
    ("stats", "TestCuda.test_memory_allocation"),
    ("stats", "TestCuda.test_memory_stats"),
    ("stats", "TestCuda.test_matmul_memory_use"),
    ("stats", "TestCuda.test_cublas_workspace_explicit_allocation"),
    ("stats", "TestCuda.test_cuda_memory_leak_detection_propagates_errors"),
    ("stats", "TestCudaAutocast.test_autocast_cache_leak"),
    ("stats", "TestCudaMallocAsync.test_cachingAllocator_raw_alloc"),
    ("stats", "TestCudaMallocAsync.test_device_memory_used"),
    # empty_cache and the caching allocator itself
    ("caching allocator", "TestCudaMallocAsync.test_allocator_fuzz"),
    ("caching allocator", "TestCudaMallocAsync.test_allocator_settings"),
    ("caching allocator", "TestCudaMallocAsync.test_max_split_expandable"),
    ("caching allocator", "TestCudaMallocAsync.test_garbage_collect_expandable"),
    # out of memory
    ("oom", "TestCuda.test_out_of_memory"),
    ("oom", "TestCuda.test_out_of_memory_retry"),
    ("oom", "TestCudaMallocAsync.test_raises_oom_*"),
    ("oom", "TestCudaMallocAsync.test_notifies_oom"),
    # memory fraction
    ("memory fraction", "TestCuda.test_set_per_process_memory_fraction"),
    ("memory fraction", "TestCuda.test_get_per_process_memory_fraction"),
    # record_stream
    ("record_stream", "TestCuda.test_record_stream"),
    ("record_stream", "TestCuda.test_record_stream_on_shifted_view"),
    ("record_stream", "TestCuda.test_caching_allocator_record_stream_oom"),
    # snapshots and _record_memory_history
    ("snapshots", "TestCudaMallocAsync.test_memory_snapshot"),
    ("snapshots", "TestCudaMallocAsync.test_memory_snapshot_with_cpp"),
    ("snapshots", "TestCudaMallocAsync.test_memory_snapshot_script"),
    ("snapshots", "TestCudaMallocAsync.test_memory_snapshot_skip_actions"),
    ("snapshots", "TestCudaMallocAsync.test_memory_plots"),
    ("snapshots", "TestCudaMallocAsync.test_memory_plots_free_stack"),
    ("snapshots", "TestCudaMallocAsync.test_memory_plots_history_context"),
    ("snapshots", "TestCudaMallocAsync.test_memory_plots_free_segment_stack"),
    ("snapshots", "TestCudaMallocAsync.test_memory_plots_metadata"),
    ("snapshots", "TestCudaMallocAsync.test_memory_profiler_viz"),
]
# --group graphs: memory behaviour under CUDA graph capture (private pools)
GRAPH_TESTS = [
    ("graphs", "TestCuda.test_graph_capture_simple"),
    ("graphs", "TestCuda.test_graph_record_stream"),
    ("graphs", "TestCuda.test_graph_two_successive"),
    ("graphs", "TestCuda.test_graph_three_successive"),
    ("graphs", "TestCuda.test_graph_concurrent_replay"),
    ("graphs", "TestCuda.test_graph_memory_stats_and_use_result_after_destroy_graph"),
    ("graphs", "TestCuda.test_memory_stats_of_multiple_generators_and_graphs"),
    ("graphs", "TestCuda.test_repeat_graph_capture_cublas_workspace_memory"),
    ("graphs", "TestCuda.test_cuda_graph_allocator_propagates_stream"),
    ("graphs", "TestCuda.test_graph_capture_oom"),
]
# --group mempool: torch.cuda.MemPool, which cannot work in replace mode (expected to fail with a
# message; shows which message)
MEMPOOL_TESTS = [
    ("mempool", "TestMemPool.test_mempool_empty_cache"),
    ("mempool", "TestMemPool.test_mempool_no_split"),
    ("mempool", "TestMemPool.test_nested_mempool"),
]
GROUPS = {"graphs": GRAPH_TESTS, "mempool": MEMPOOL_TESTS}


def matches(test_id, pattern):
    """pytest -k style: a pattern with `*`/`?` is a glob on Class.method; with a dot, the exact id;
    otherwise a substring of the id."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(test_id, pattern)
    if "." in pattern:
        return test_id == pattern
    return pattern in test_id


# =============================================================================================
# Child: one mode, one process.
# =============================================================================================

def install_shims(torch):
    """Patches 1-3 of the docstring; returns what was done, for the report."""
    done = []
    try:
        import expecttest  # noqa: F401
    except ImportError:
        import glob
        wheels = sorted(glob.glob(os.path.join(WHEELS, "expecttest-*.whl")))
        if wheels:
            sys.path.insert(0, wheels[-1])
            done.append("expecttest from " + os.path.basename(wheels[-1]))
        else:
            import types
            import unittest
            stub = types.ModuleType("expecttest")
            stub.TestCase = unittest.TestCase
            stub.ACCEPT = False
            sys.modules["expecttest"] = stub
            done.append("expecttest stubbed")
    try:
        import psutil  # noqa: F401
    except ImportError:
        import types
        stub = types.ModuleType("psutil")
        stub.disk_partitions = lambda *a, **k: []
        sys.modules["psutil"] = stub
        done.append("psutil stubbed (used only by TestGDS)")
    import torch.testing._internal.common_utils as cu
    if not hasattr(cu, "TEST_CUDAMALLOCASYNC"):
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
        cu.TEST_CUDAMALLOCASYNC = bool(cu.TEST_CUDA) and "backend:cudaMallocAsync" in conf
        done.append("common_utils.TEST_CUDAMALLOCASYNC = %s" % cu.TEST_CUDAMALLOCASYNC)
    return done


class Recorder:
    """Appends one JSON line per event to the child's file, flushed at once, so that a crash
    leaves everything up to the test that was running."""

    def __init__(self, path):
        self.f = open(path, "a")

    def write(self, **d):
        self.f.write(json.dumps(d) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())


def first_line(err):
    etype, value, _ = err
    text = str(value).strip()
    return "%s: %s" % (etype.__name__, text.splitlines()[0][:300] if text else "")


def child_main(spec):
    import faulthandler
    import unittest
    rec = Recorder(spec["out"])
    mode = spec["mode"]
    sys.argv = [sys.argv[0]]  # patch 4: common_utils parses the command line at import time
    try:
        import torch
        if MODES[mode] and not spec.get("list_only"):
            try:
                import gpumem.torch
            except Exception as e:
                rec.write(event="fatal", message="`import gpumem.torch` failed: %s: %s" % (type(e).__name__, e))
                return 3
            gpumem.torch.enable(policy=MODES[mode])
        shims = install_shims(torch)
        import importlib.util
        sp = importlib.util.spec_from_file_location("test_cuda", spec["test_file"])
        mod = importlib.util.module_from_spec(sp)
        sys.modules["test_cuda"] = mod
        sp.loader.exec_module(mod)
    except BaseException as e:
        rec.write(event="fatal", message="%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else ""),
                  traceback=traceback.format_exc()[-3000:])
        return 3
    backend = None
    try:
        backend = torch.cuda.memory.get_allocator_backend()
    except Exception as e:
        backend = "? (%s)" % e
    rec.write(event="meta", torch=torch.__version__, cuda=torch.version.cuda, shims=shims,
              cuda_available=torch.cuda.is_available(), allocator_backend=backend,
              device=torch.cuda.get_device_name() if torch.cuda.is_available() else None)

    # the selected tests, in a fixed order: class order of the module, method names sorted
    loader = unittest.TestLoader()
    ids = []
    for name, obj in vars(mod).items():
        if isinstance(obj, type) and issubclass(obj, unittest.TestCase) and obj.__module__ == "test_cuda":
            for meth in loader.getTestCaseNames(obj):
                tid = "%s.%s" % (name, meth)
                if any(matches(tid, p) for p in spec["patterns"]):
                    ids.append((tid, obj, meth))
    rec.write(event="selected", ids=[t for t, _, _ in ids])
    if spec.get("list_only"):
        return 0
    skip = set(spec["skip"])

    class Result(unittest.TestResult):
        def __init__(self):
            super().__init__()
            self.outcome, self.message, self.tb, self.sub_failures = "pass", None, None, []

        def _set(self, outcome, err):
            self.outcome, self.message = outcome, first_line(err)
            self.tb = "".join(traceback.format_exception(*err))[-2500:]

        def addFailure(self, test, err):
            self._set("fail", err)

        def addError(self, test, err):
            self._set("error", err)

        def addSkip(self, test, reason):
            self.outcome, self.message = "skip", str(reason)[:300]

        def addExpectedFailure(self, test, err):
            self.outcome, self.message = "expected failure", first_line(err)

        def addUnexpectedSuccess(self, test):
            self.outcome, self.message = "unexpected success", None

        def addSubTest(self, test, subtest, err):
            if err is not None:
                self.sub_failures.append("%s: %s" % (subtest._subDescription(), first_line(err)))
                if self.outcome == "pass":
                    self._set("fail" if issubclass(err[0], test.failureException) else "error", err)

    for tid, cls, meth in ids:
        if tid in skip:
            continue
        rec.write(event="start", id=tid)
        faulthandler.dump_traceback_later(spec["test_timeout"], exit=True)  # a hang ends the child
        t0 = time.perf_counter()
        res = Result()
        cls(meth).run(res)
        faulthandler.cancel_dump_traceback_later()
        rec.write(event="result", id=tid, outcome=res.outcome, message=res.message, traceback=res.tb,
                  subtests_failed=res.sub_failures, seconds=round(time.perf_counter() - t0, 3))

    # the runner's own check: memory_summary (test_cuda.py has no test of it) and memory_stats
    rec.write(event="start", id="runner.memory_summary")
    try:
        s = torch.cuda.memory_summary()
        st = torch.cuda.memory_stats()
        ok = isinstance(s, str) and "memory summary" in s.lower() and isinstance(st, dict) and len(st) > 0
        rec.write(event="result", id="runner.memory_summary", outcome="pass" if ok else "fail",
                  message=None if ok else "summary %r..., %d stats keys" % (s[:80], len(st)), seconds=0)
    except Exception as e:
        rec.write(event="result", id="runner.memory_summary", outcome="error",
                  message="%s: %s" % (type(e).__name__, str(e).splitlines()[0][:300] if str(e) else ""), seconds=0)
    rec.write(event="done")
    return 0


# =============================================================================================
# Parent: the modes, the restarts, the report.
# =============================================================================================

def read_events(path):
    ev = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        ev.append(json.loads(line))
                    except ValueError:
                        pass  # a line cut by a kill
    return ev


def run_mode(mode, args, patterns):
    """Runs the mode's tests, restarting a child after each crash or hang until all ran."""
    out = {"tests": {}, "selected": [], "restarts": 0, "fatal": None, "meta": None}
    t_end = time.time() + args.mode_timeout
    os.makedirs(args.out, exist_ok=True)
    attempt = 0
    while True:
        attempt += 1
        jpath = os.path.join(args.out, "%s.%d.jsonl" % (mode, attempt))
        lpath = os.path.join(args.out, "%s.%d.log" % (mode, attempt))
        if os.path.exists(jpath):
            os.remove(jpath)
        spec = {"mode": mode, "out": jpath, "test_file": args.test_file, "patterns": patterns,
                "skip": sorted(out["tests"]), "test_timeout": args.test_timeout, "list_only": args.list}
        env = dict(os.environ)
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        env.setdefault("PYTORCH_TEST_WITH_SLOW", "0")
        with open(lpath, "w") as log:
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                rc = p.wait(timeout=max(5, t_end - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
                rc = "killed after --mode-timeout"
        ev = read_events(jpath)
        running = None
        for e in ev:
            if e["event"] == "fatal":
                out["fatal"] = e["message"]
                out["fatal_traceback"] = e.get("traceback")
            elif e["event"] == "meta":
                out["meta"] = e
            elif e["event"] == "selected":
                out["selected"] = e["ids"]
            elif e["event"] == "start":
                running = e["id"]
            elif e["event"] == "result":
                out["tests"][e["id"]] = {k: v for k, v in e.items() if k not in ("event", "id")}
                running = None
        done = any(e["event"] == "done" for e in ev)
        if out["fatal"] or done or args.list:
            break
        with open(lpath) as f:
            tail = f.read()[-1500:]
        if running is not None:
            if isinstance(rc, str):
                why = "timeout (%s)" % rc
            elif "Timeout (" in tail:
                why = "timeout (> %d s; faulthandler ended the process)" % args.test_timeout
            else:
                why = "crash (process exit %s)" % rc
            out["tests"][running] = {"outcome": "crash" if why.startswith("crash") else "timeout",
                                     "message": why, "log_tail": tail, "seconds": None}
        else:
            out["fatal"] = "child exited (%s) outside any test; log: %s" % (rc, lpath)
            break
        out["restarts"] += 1
        if time.time() >= t_end:
            out["fatal"] = "--mode-timeout reached; tests left unrun"
            break
    return out


def counts(tests):
    c = {}
    for t in tests.values():
        c[t["outcome"]] = c.get(t["outcome"], 0) + 1
    return c


def area_of(test_id, table):
    for area, pat in table:
        if matches(test_id, pat):
            return area
    return "runner" if test_id.startswith("runner.") else "-k"


def report_text(doc, table):
    modes = list(doc["modes"])
    ids = []
    for m in modes:
        for t in doc["modes"][m]["selected"] + list(doc["modes"][m]["tests"]):
            if t not in ids:
                ids.append(t)
    lines = ["PyTorch memory tests under gpumem: %s" % (doc["source"] if doc["test_file"] == DEFAULT_TEST_FILE
                                                          else doc["test_file"]),
             "test file sha256 %s" % doc["test_file_sha256"], ""]
    for m in modes:
        md = doc["modes"][m]
        meta = md.get("meta") or {}
        lines.append("mode %-13s torch %s, allocator backend %s, shims: %s; %s%s" % (
            m, meta.get("torch"), meta.get("allocator_backend"), "; ".join(meta.get("shims", [])) or "none",
            ", ".join("%d %s" % (v, k) for k, v in sorted(counts(md["tests"]).items())) or "no results",
            "; FATAL: " + md["fatal"] if md.get("fatal") else ""))
    lines.append("")
    w = max([len(i) for i in ids] + [10])
    lines.append("%-17s %-*s %s" % ("area", w, "test", "  ".join("%-18s" % m for m in modes)))
    for tid in ids:
        outs = []
        for m in modes:
            t = doc["modes"][m]["tests"].get(tid)
            outs.append("%-18s" % (t["outcome"] if t else "not run"))
        lines.append("%-17s %-*s %s" % (area_of(tid, table), w, tid, "  ".join(outs)))
        for m in modes:
            t = doc["modes"][m]["tests"].get(tid)
            if t and t["outcome"] not in ("pass", "skip") and t.get("message"):
                lines.append("%17s   [%s] %s" % ("", m, t["message"]))
            if t and t["outcome"] == "skip" and m == modes[-1]:
                lines.append("%17s   [skip] %s" % ("", t.get("message")))
    if len(modes) > 1 and "default" in modes:
        lines.append("")
        for m in modes:
            if m == "default":
                continue
            worse = [tid for tid in ids if (doc["modes"]["default"]["tests"].get(tid) or {}).get("outcome") == "pass"
                     and (doc["modes"][m]["tests"].get(tid) or {}).get("outcome") not in ("pass", None)]
            lines.append("%s: %d test(s) pass under default but not under %s: %s" % (
                m, len(worse), m, ", ".join(worse) or "none"))
    return "\n".join(lines)


def main(argv):
    if argv[:1] == ["--child"]:
        return child_main(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="gpumem-torch",
                   help="comma-separated, from %s (default gpumem-torch)" % ",".join(MODES))
    p.add_argument("--test-file", default=DEFAULT_TEST_FILE, help="PyTorch's test_cuda.py (default .gpu-extra/test_cuda.py)")
    p.add_argument("--out", default="bench-out/torch-memory-tests", help="output directory (default bench-out/torch-memory-tests)")
    p.add_argument("-k", dest="patterns", action="append", default=None,
                   help="select tests like pytest -k (substring; Class.method exact; or a glob); repeatable; "
                        "replaces the default selection")
    p.add_argument("--group", action="append", default=[], choices=sorted(GROUPS),
                   help="add a group of tests to the selection (graphs, mempool)")
    p.add_argument("--test-timeout", type=int, default=45, help="seconds one test may take before its process is ended")
    p.add_argument("--mode-timeout", type=int, default=85, help="seconds all the tests of one mode may take")
    p.add_argument("--list", action="store_true", help="list the selected test ids (imports the file, runs no test)")
    args = p.parse_args(argv)
    modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
    for m in modes:
        if m not in MODES:
            p.error("unknown mode %r (choose from %s)" % (m, ",".join(MODES)))
    if not os.path.exists(args.test_file):
        p.error("no test file at %s: fetch PyTorch's test/test_cuda.py there (see docs/train-bench.md)" % args.test_file)
    table = list(DEFAULT_TESTS)
    for g in args.group:
        table += GROUPS[g]
    patterns = args.patterns if args.patterns else [pat for _, pat in table]
    with open(args.test_file, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    doc = {"source": SOURCE, "test_file": args.test_file, "test_file_sha256": sha, "patterns": patterns, "modes": {}}
    t0 = time.time()
    for m in (modes[:1] if args.list else modes):
        print("== mode %s" % m, flush=True)
        doc["modes"][m] = run_mode(m, args, patterns)
    if args.list:
        md = doc["modes"][modes[0]]
        if md.get("fatal"):
            print("FATAL: " + md["fatal"])
            return 1
        for tid in md["selected"]:
            print("%-17s %s" % (area_of(tid, table), tid))
        print("%d tests selected" % len(md["selected"]))
        return 0
    doc["elapsed_s"] = round(time.time() - t0, 1)
    text = report_text(doc, table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(args.out, "results.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    print("\nelapsed %.0f s; %s/results.json and results.txt" % (doc["elapsed_s"], args.out))
    return 1 if any(doc["modes"][m].get("fatal") for m in modes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
