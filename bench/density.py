#!/usr/bin/env python3
"""Density: many branches of one database, a few busy, the rest suspended.

    bench/density.py [--branches 100] [--busy 10] [--seconds 20]

Creates BRANCHES branches of a pgbench database (scale 1) in a temporary data directory, lets
the idle ones suspend, runs pgbench on BUSY of them at once through the proxy, and prints:
  - processes of the suspended branches (goal: none);
  - total and per-compute proportional resident memory (PSS) of the busy computes
    (goal: at most 64 MiB each with the default settings), and that of the processes all
    branches share (the daemon; the pagestore server, whose write buffer is part of it);
  - the proxy's overhead as the issue sets it: the total pgbench throughput of the BUSY
    branches at once, through the proxy against their computes' Unix sockets directly, in
    the same run, interleaved (goal: within 5%);
  - the harshest case for a relay: one compute, 2 clients, select-only and TPC-B, through the
    proxy against its Unix socket, and the CPU each costs per transaction (pgbench, the
    compute and the daemon): on a shared 2-core host the
    throughput ratio moves with the load from elsewhere, the CPU cost much less. TCP loopback
    alone (which no TCP endpoint avoids) is measured by bench/relay.py, as is the relay
    without the daemon.
Everything it starts is stopped and removed at the end.
"""
import argparse, json, os, re, resource, shutil, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where `cargo build --release` below puts the binary.
STEMMA = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "stemma")
TICK = os.sysconf("SC_CLK_TCK")


def run(*args, env=None, check=True, capture=True):
    return subprocess.run(args, env=env, check=check, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


def stemma(env, *args):
    out = run(STEMMA, "--output", "json", *args, env=env).stdout
    return json.loads(out) if out.strip().startswith(("{", "[")) else out


def pss_kib(pid):
    """PSS of a postmaster and all its children, in KiB."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == pid:
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                m = re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M)
                total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def pids_with(*words):
    """Processes whose command line contains every one of `words`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(w in cmd for w in words):
                found.append(int(entry))
    return found


def own_pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            m = re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M)
            return int(m.group(1)) if m else 0
    except OSError:
        return 0


def cpu_s(pid):
    """CPU seconds of a process, its threads and its reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / TICK


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pgbench_tps(pgbin, conn, seconds, extra, pids=()):
    """(tps, CPU microseconds per transaction of pgbench and of `pids`)."""
    before = sum(cpu_s(p) for p in pids) + children_cpu_s()
    out = run(os.path.join(pgbin, "pgbench"), "-n", "-c", "2", "-j", "2", "-T", str(seconds), *extra, conn).stdout
    # The backends have exited, and been reaped by the postmaster, once pgbench is done.
    time.sleep(0.2)
    used = sum(cpu_s(p) for p in pids) + children_cpu_s() - before
    m = re.search(r"tps = ([\d.]+)", out)
    n = re.search(r"number of transactions actually processed: (\d+)", out)
    txns = int(n.group(1)) if n else 0
    return (float(m.group(1)) if m else 0.0), (used / txns * 1e6 if txns else 0.0)


def direct_uri(run_dir, info):
    """A URI for the branch's compute through its Unix socket (the lock file names its pid)."""
    pid = info["compute"]["pid"]
    sock_dir = None
    for d in os.listdir(run_dir):
        try:
            with open(os.path.join(run_dir, d, ".s.PGSQL.5432.lock")) as f:
                if int(f.readline()) == pid:
                    sock_dir = os.path.join(run_dir, d)
        except (OSError, ValueError):
            pass
    if sock_dir is None:
        sys.exit(f"no Unix socket found for the compute of {info['name']} (pid {pid})")
    creds = info["connection_string"].split("//", 1)[1].split("@", 1)[0]
    return f"postgresql://{creds}@/{info['database']}?host={sock_dir}&port=5432"


def parallel_tps(pgbin, conns, seconds):
    """Total tps of one pgbench (1 client, TPC-B) per connection string, all at once."""
    procs = [subprocess.Popen([os.path.join(pgbin, "pgbench"), "-n", "-c", "1", "-T", str(seconds), c],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in conns.values()]
    total = 0.0
    for p in procs:
        out, _ = p.communicate()
        m = re.search(r"tps = ([\d.]+)", out)
        total += float(m.group(1)) if m else 0.0
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--branches", type=int, default=100)
    ap.add_argument("--busy", type=int, default=10)
    ap.add_argument("--seconds", type=int, default=20)
    a = ap.parse_args()

    run("bash", os.path.join(ROOT, "scripts", "install-deps.sh"), capture=False)
    run("cargo", "build", "--release", "--quiet", "-p", "stemma-cli", capture=False)
    work = tempfile.mkdtemp(prefix="stemma-bench-")
    os.chmod(work, 0o711)
    env = dict(os.environ, STEMMA_DATA_DIR=os.path.join(work, "data"))
    try:
        run(STEMMA, "up", "--api-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0",
            "--port-base", "43000", "--suspend-timeout", "3s", "--max-computes", str(a.busy + 5), env=env)
        status = stemma(env, "status")
        pgbin = status["postgres_bin_dir"]
        main_conn = stemma(env, "connection-string", "main")["connection_string"]
        run(os.path.join(pgbin, "pgbench"), "-i", "-q", "-s", "1", main_conn)
        t0 = time.time()
        for i in range(a.branches):
            stemma(env, "branch", "create", f"b{i:03}", "--parent", "main")
        create_s = time.time() - t0
        # Let every compute suspend.
        deadline = time.time() + 120
        while time.time() < deadline and stemma(env, "status")["computes"]:
            time.sleep(1)
        branches = {b["name"]: b for b in stemma(env, "branch", "list")}
        busy = [f"b{i:03}" for i in range(a.busy)]
        for b in busy:
            stemma(env, "branch", "set", b, "--suspend-timeout", "0")
        procs = [subprocess.Popen([os.path.join(pgbin, "pgbench"), "-n", "-c", "1", "-T", str(a.seconds),
                                   branches[b]["connection_string"]], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for b in busy]
        time.sleep(a.seconds / 2)
        status = stemma(env, "status")
        running = {c["branch"]: c["pid"] for c in status["computes"]}
        pss = {b: pss_kib(pid) for b, pid in running.items()}
        # The processes every branch shares, measured at the same moment: the daemon (API,
        # proxy) and, on the pagestore, its server (mounts, index, write buffer up to 1 GiB).
        data_dir = os.path.join(work, "data")
        shared = [(name, sum(own_pss_kib(p) for p in ps)) for name, ps in
                  [("daemon", pids_with("stemma", " serve --data-dir", data_dir)),
                   ("pagestore server", pids_with("pagestore-server", data_dir))] if ps]
        tps = []
        for p in procs:
            out, _ = p.communicate()
            m = re.search(r"tps = ([\d.]+)", out)
            tps.append(float(m.group(1)) if m else 0.0)
        suspended = [b for b in branches if b not in running]
        pg_procs = int(run("pgrep", "-c", "-x", "postgres", check=False).stdout.strip() or 0)

        print(f"branches: {a.branches} (+ main), created in {create_s:.1f}s "
              f"({create_s / a.branches * 1000:.0f} ms each, {status.get('storage', '?')} driver)")
        print(f"running computes: {len(running)}; suspended branches: {len(suspended)} with no process "
              f"(postgres processes on the host: {pg_procs})")
        if pss:
            vals = sorted(pss.values())
            print(f"busy compute PSS: total {sum(vals) / 1024:.1f} MiB, per compute "
                  f"median {vals[len(vals) // 2] / 1024:.1f} MiB, max {vals[-1] / 1024:.1f} MiB (goal <= 64 MiB)")
        print("shared processes (while pgbench ran): " + ", ".join(
            f"{name} PSS {kib / 1024:.1f} MiB" for name, kib in shared))
        print(f"pgbench on {a.busy} branches at once: {sum(tps):.0f} tps total")

        # Proxy overhead as the issue sets it: the BUSY branches running pgbench at once,
        # through the proxy and then through their computes' Unix sockets directly, in turn,
        # three rounds (medians of the total tps).
        run_dir = os.path.join(work, "data", "run")
        infos = {b: stemma(env, "branch", "get", b) for b in busy}
        direct = {b: direct_uri(run_dir, infos[b]) for b in busy}
        proxied = {b: infos[b]["connection_string"] for b in busy}
        secs = max(5, a.seconds // 2)
        via_all, direct_all = [], []
        for _ in range(3):
            via_all.append(parallel_tps(pgbin, proxied, secs))
            direct_all.append(parallel_tps(pgbin, direct, secs))
        v, d = sorted(via_all)[1], sorted(direct_all)[1]
        print(f"proxy overhead, {a.busy} branches running pgbench (TPC-B, 1 client each) at once: "
              f"{v:.0f} tps via proxy (TCP) vs {d:.0f} tps direct (Unix sockets): ratio {v / d:.3f} "
              f"(goal >= 0.95); rounds via {[round(x) for x in via_all]}, direct {[round(x) for x in direct_all]}")

        # The harshest case for a relay: one compute, 2 clients, in turn through the proxy and
        # through its Unix socket, with the CPU each costs per transaction.
        b = busy[0]
        info = infos[b]
        proxy_conn = info["connection_string"]
        pid = info["compute"]["pid"]
        direct_conn = direct[b]
        # The proxy's threads run in the daemon; the compute's backends are reaped by its postmaster.
        pids = (status["pid"], pid)
        for label, extra in [("select-only", ["-S"]), ("tpc-b", [])]:
            via, dir_ = [], []
            for _ in range(3):
                via.append(pgbench_tps(pgbin, proxy_conn, secs, extra, pids))
                dir_.append(pgbench_tps(pgbin, direct_conn, secs, extra, pids))
            (v, vcpu), (d, dcpu) = sorted(via)[1], sorted(dir_)[1]
            print(f"proxy overhead, one compute, {label} (pgbench -c 2 -j 2): {v:.0f} tps via proxy (TCP) vs {d:.0f} tps "
                  f"direct (Unix socket): ratio {v / d:.3f}; CPU per transaction "
                  f"{vcpu:.0f} vs {dcpu:.0f} us ({vcpu - dcpu:+.0f} us)")
    finally:
        run(STEMMA, "down", env=env, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
