#!/usr/bin/env python3
"""The proxy's relay alone, against direct connections, in the same run.

    bench/relay.py --socket-dir DIR --port P [--tcp-port P] [--relay BIN ...] [--socat]
                   [--rounds 5] [--seconds 5] [--clients 2] [--user postgres] [--db postgres]

Needs one running PostgreSQL with a pgbench database (`pgbench -i -s 1`), listening on the Unix
socket DIR/.s.PGSQL.P and, for the TCP baseline, on 127.0.0.1:P as well. Each `--relay` is a
build of `cargo build --release -p stemma-proxy --example relay` (pass the shipped one and a
candidate to compare two relays); `--socat` adds socat as a trivial relay for control.

Every round runs each target once, in turn (interleaved, so that load from elsewhere on the host
hits all of them alike); medians per target are printed as tps and as ratios against the Unix
socket (what the compute offers) and against direct TCP (what any TCP relay can at best reach).
"""
import argparse, os, re, resource, shutil, socket, statistics, subprocess, sys, time


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on 127.0.0.1:{port}")


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """CPU seconds of a process, its threads and its reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / TICK


def kworkers():
    """Kernel worker threads: some in-kernel relays do their work there."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().startswith("kworker"):
                    pids.append(int(entry))
        except (OSError, ValueError):
            pass
    return pids


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pgbench(host, port, a, extra, pids):
    """(tps, CPU seconds used by pgbench and by `pids`, transactions)."""
    pids = pids + (kworkers() if a.kworkers else [])
    before = {p: cpu_s(p) for p in pids}
    children = children_cpu_s()
    out = subprocess.run(["pgbench", "-n", "-c", str(a.clients), "-j", str(a.clients), "-T", str(a.seconds),
                          "-h", host, "-p", str(port), "-U", a.user, *extra, a.db],
                         check=True, text=True, capture_output=True).stdout
    # The backends have exited, and been reaped by the postmaster, once pgbench is done.
    time.sleep(0.2)
    used = children_cpu_s() - children
    for p, b in before.items():
        now = cpu_s(p)
        if b is not None and now is not None:
            used += now - b
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
    txns = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    return tps, used, txns


def main():
    # The proxy refuses SSL; skip the extra round trip everywhere alike.
    os.environ.setdefault("PGSSLMODE", "disable")
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket-dir", required=True)
    ap.add_argument("--port", type=int, required=True, help="the Unix socket's port number")
    ap.add_argument("--tcp-port", type=int, help="PostgreSQL's own TCP port on 127.0.0.1 (a baseline)")
    ap.add_argument("--relay", action="append", default=[], help="a build of the relay example")
    ap.add_argument("--socat", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--user", default="postgres")
    ap.add_argument("--db", default="postgres")
    ap.add_argument("--modes", default="select-only,tpc-b")
    ap.add_argument("--kworkers", action="store_true",
                    help="count the CPU of kernel workers too (shared with the rest of the host)")
    a = ap.parse_args()

    sock = os.path.join(a.socket_dir, f".s.PGSQL.{a.port}")
    with open(sock + ".lock") as f:
        postmaster = int(f.readline())
    # (name, host, port, the relay's pid or None)
    targets = [("unix", a.socket_dir, a.port, None)]
    if a.tcp_port:
        targets.append(("tcp", "127.0.0.1", a.tcp_port, None))
    procs = []
    port = 55600
    try:
        if a.socat:
            procs.append(subprocess.Popen([shutil.which("socat"), f"TCP-LISTEN:{port},fork,reuseaddr,nodelay",
                                           f"UNIX-CONNECT:{sock}"]))
            targets.append(("socat", "127.0.0.1", port, procs[-1].pid))
            port += 1
        for i, relay in enumerate(a.relay):
            procs.append(subprocess.Popen([relay, str(port), sock]))
            targets.append((f"relay{i}:{os.path.basename(relay)}", "127.0.0.1", port, procs[-1].pid))
            port += 1
        for _, host, p, _ in targets[1:]:
            wait_port(p)
        load = os.getloadavg()
        for mode in a.modes.split(","):
            extra = ["-S"] if mode == "select-only" else []
            tps = {t[0]: [] for t in targets}
            cpu = {t[0]: [] for t in targets}
            for r in range(a.rounds):
                # Rotate the order each round, so that no target always runs first.
                for name, host, p, pid in targets[r % len(targets):] + targets[:r % len(targets)]:
                    t, used, txns = pgbench(host, p, a, extra, [postmaster] + ([pid] if pid else []))
                    tps[name].append(t)
                    cpu[name].append(used / txns * 1e6)
            med = {k: statistics.median(v) for k, v in tps.items()}
            us = {k: statistics.median(v) for k, v in cpu.items()}
            print(f"{mode} (pgbench -c {a.clients} -j {a.clients} -T {a.seconds}, {a.rounds} rounds, median; "
                  "CPU = pgbench + PostgreSQL + relay per transaction):")
            for name, *_ in targets:
                line = f"  {name:24} {med[name]:9.0f} tps  vs unix {med[name] / med['unix']:.3f}"
                if "tcp" in med:
                    line += f"  vs tcp {med[name] / med['tcp']:.3f}"
                line += f"  CPU {us[name]:6.1f} us/txn ({us[name] - us['unix']:+6.1f})"
                line += "   [" + " ".join(f"{x:.0f}" for x in tps[name]) + "]"
                print(line)
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
              + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    finally:
        for p in procs:
            p.terminate()
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
