//! The kernel shortcut: once a plain connection is set up, the client's socket and the
//! compute's socket send to each other directly, inside the kernel, and the proxy's threads
//! no longer wake up for a query.
//!
//! Why: a relay in userspace costs two thread wake-ups and four syscalls per round trip
//! (ARCHITECTURE.md, "What the relay costs"), which on a 2-core host is a quarter of a busy
//! compute's throughput. Redirecting one direction with an `SK_SKB` program did not help
//! (the kernel does that send in a workqueue, so a kworker wakes instead of a thread). An
//! `SK_MSG` program redirecting into the receiving socket's ingress queue does the work in
//! the sender's own `sendmsg`, and wakes the reader directly: one wake-up per message, as on
//! a direct connection, and no TCP processing at all.
//!
//! How: both ends the proxy does not own must be in a `SOCKHASH`: the client's socket (it
//! connected to one of the proxy's ports) and the compute's socket (PostgreSQL accepted the
//! proxy's connection on the compute's private TCP port). A `SOCK_OPS` program attached to the
//! root of the cgroup v2 hierarchy adds exactly those sockets as they are established, keyed
//! by their 4-tuple as each sees it; the ports and addresses it watches are in the `ports`
//! map and only sockets of the proxy's own network namespace are taken, so no socket of
//! another program (or container) that is not a client of ours is touched. When the proxy has relayed the startup phase (the session
//! is idle, the client waits for ReadyForQuery), it joins the two sockets in the `pairs` map:
//! from then on the `SK_MSG` program, run on every send of a socket in the `SOCKHASH`, finds
//! the peer and redirects the bytes into it (`bpf_msg_redirect_hash(.., BPF_F_INGRESS)`).
//! The proxy's own two sockets stay open and carry only the closing of the connection.
//!
//! The programs are written out as instructions rather than compiled: they need no BPF
//! toolchain (clang, bpf-linker) and no crate beyond `libc`, and they are 30 instructions
//! each. The kernel's verifier checks them at load; a failure is reported with its log.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN), a cgroup v2 hierarchy and Linux 5.15 or later. When
//! any step fails, [`Shortcut::install`] says why and the proxy relays in userspace.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

// From <linux/bpf.h>; stable kernel ABI.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_PROG_TYPE_SK_MSG: u32 = 16;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_SK_MSG_VERDICT: u32 = 7;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_MAP_DELETE_ELEM: i32 = 3;
const BPF_FUNC_SOCK_HASH_UPDATE: i32 = 70;
const BPF_FUNC_MSG_REDIRECT_HASH: i32 = 71;
const BPF_FUNC_GET_NETNS_COOKIE: i32 = 122;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: i32 = 1;
const BPF_F_INGRESS: i32 = 1;
const SOCK_OPS_ACTIVE_ESTABLISHED: i32 = 4;
const SOCK_OPS_PASSIVE_ESTABLISHED: i32 = 5;
const SK_PASS: i32 = 1;
const AF_INET: i32 = 2;

// Field offsets in `struct bpf_sock_ops` and `struct sk_msg_md`.
const OPS_OP: i16 = 0;
const OPS_FAMILY: i16 = 20;
const OPS_REMOTE_IP4: i16 = 24;
const OPS_LOCAL_IP4: i16 = 28;
const OPS_REMOTE_PORT: i16 = 64;
const OPS_LOCAL_PORT: i16 = 68;
const MSG_FAMILY: i16 = 16;
const MSG_REMOTE_IP4: i16 = 20;
const MSG_LOCAL_IP4: i16 = 24;
const MSG_REMOTE_PORT: i16 = 60;
const MSG_LOCAL_PORT: i16 = 64;
const MSG_SIZE: i16 = 68;

/// Sockets the `SOCKHASH` can hold: two per joined connection, so 8192 connections at once
/// (more are relayed). The `pairs` hash is preallocated at this size: about 1 MiB of kernel
/// memory.
const MAX_SOCKETS: u32 = 16_384;

/// `union bpf_attr`, large enough for every command used here (the kernel takes a prefix
/// and checks that the rest is zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(mut self, offset: usize, v: u32) -> Self {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, offset: usize, v: u64) -> Self {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the size passed; pointers inside it
    // refer to buffers that live across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_of(r: libc::c_long) -> OwnedFd {
    // SAFETY: the bpf syscall returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(r as i32) }
}

fn create_map(kind: u32, key: u32, value: u32, entries: u32) -> io::Result<OwnedFd> {
    // map_type, key_size, value_size, max_entries.
    let mut attr = Attr::new()
        .u32(0, kind)
        .u32(4, key)
        .u32(8, value)
        .u32(12, entries);
    bpf(BPF_MAP_CREATE, &mut attr).map(fd_of)
}

fn map_update<K, V>(map: &OwnedFd, key: &K, value: &V) -> io::Result<()> {
    // map_fd, key, value, flags.
    let mut attr = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key as *const K as u64)
        .u64(16, value as *const V as u64)
        .u64(24, BPF_ANY);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn map_delete<K>(map: &OwnedFd, key: &K) -> io::Result<()> {
    let mut attr = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key as *const K as u64);
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// Whether `key` is in `map` (for a `SOCKHASH`, the kernel answers with the socket's cookie).
fn map_contains<K>(map: &OwnedFd, key: &K) -> bool {
    // Larger than any value of the maps here.
    let mut value = [0u8; 64];
    let mut attr = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key as *const K as u64)
        .u64(16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).is_ok()
}

/// A socket as it sees itself, in the layout both programs build on their stacks from the
/// context fields: addresses in network byte order, the local port in host byte order, the
/// remote port as the kernel presents it (network byte order in the upper half).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tuple {
    local_ip4: u32,
    remote_ip4: u32,
    local_port: u32,
    remote_port: u32,
}

/// The `ports` map's key for a port the client side connects to (compared with
/// `remote_port`).
fn remote_port_key(port: u16) -> u32 {
    u32::from(u16::from_ne_bytes(port.to_be_bytes())) << 16
}

impl Tuple {
    fn new(local: SocketAddrV4, remote: SocketAddrV4) -> Tuple {
        Tuple {
            local_ip4: u32::from_ne_bytes(local.ip().octets()),
            remote_ip4: u32::from_ne_bytes(remote.ip().octets()),
            local_port: u32::from(local.port()),
            remote_port: remote_port_key(remote.port()),
        }
    }
}

/// A tiny assembler: BPF instructions with named jump targets.
#[derive(Default)]
struct Asm {
    code: Vec<[u8; 8]>,
    labels: HashMap<&'static str, usize>,
    jumps: Vec<(usize, &'static str)>,
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const FP: u8 = 10;

impl Asm {
    fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        let mut b = [0u8; 8];
        b[0] = code;
        b[1] = (src << 4) | (dst & 0x0f);
        b[2..4].copy_from_slice(&off.to_ne_bytes());
        b[4..8].copy_from_slice(&imm.to_ne_bytes());
        self.code.push(b);
        self
    }
    fn mov(&mut self, dst: u8, src: u8) -> &mut Self {
        self.raw(0xbf, dst, src, 0, 0)
    }
    fn mov_imm(&mut self, dst: u8, imm: i32) -> &mut Self {
        self.raw(0xb7, dst, 0, 0, imm)
    }
    fn add_imm(&mut self, dst: u8, imm: i32) -> &mut Self {
        self.raw(0x07, dst, 0, 0, imm)
    }
    /// dst = *(u32 *)(src + off)
    fn load32(&mut self, dst: u8, src: u8, off: i16) -> &mut Self {
        self.raw(0x61, dst, src, off, 0)
    }
    /// dst = *(u64 *)(src + off)
    fn load64(&mut self, dst: u8, src: u8, off: i16) -> &mut Self {
        self.raw(0x79, dst, src, off, 0)
    }
    /// *(u32 *)(dst + off) = src
    fn store32(&mut self, dst: u8, off: i16, src: u8) -> &mut Self {
        self.raw(0x63, dst, src, off, 0)
    }
    /// *(u64 *)(dst + off) = src
    fn store64(&mut self, dst: u8, off: i16, src: u8) -> &mut Self {
        self.raw(0x7b, dst, src, off, 0)
    }
    fn jump(&mut self, code: u8, dst: u8, imm: i32, label: &'static str) -> &mut Self {
        self.jumps.push((self.code.len(), label));
        self.raw(code, dst, 0, 0, imm)
    }
    fn jeq(&mut self, dst: u8, imm: i32, label: &'static str) -> &mut Self {
        self.jump(0x15, dst, imm, label)
    }
    fn jne(&mut self, dst: u8, imm: i32, label: &'static str) -> &mut Self {
        self.jump(0x55, dst, imm, label)
    }
    /// if dst != src goto label
    fn jne_reg(&mut self, dst: u8, src: u8, label: &'static str) -> &mut Self {
        self.jumps.push((self.code.len(), label));
        self.raw(0x5d, dst, src, 0, 0)
    }
    /// dst = a 64-bit constant (a 16-byte load).
    fn load_u64(&mut self, dst: u8, value: u64) -> &mut Self {
        self.raw(0x18, dst, 0, 0, value as u32 as i32)
            .raw(0, 0, 0, 0, (value >> 32) as u32 as i32)
    }
    fn jgt(&mut self, dst: u8, imm: i32, label: &'static str) -> &mut Self {
        self.jump(0x25, dst, imm, label)
    }
    /// lock *(u64 *)(dst + off) += src
    fn atomic_add64(&mut self, dst: u8, off: i16, src: u8) -> &mut Self {
        self.raw(0xdb, dst, src, off, 0)
    }
    fn ja(&mut self, label: &'static str) -> &mut Self {
        self.jump(0x05, 0, 0, label)
    }
    fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.insert(name, self.code.len());
        self
    }
    fn call(&mut self, helper: i32) -> &mut Self {
        self.raw(0x85, 0, 0, 0, helper)
    }
    fn exit(&mut self) -> &mut Self {
        self.raw(0x95, 0, 0, 0, 0)
    }
    /// dst = the map (a 16-byte load of the map's descriptor).
    fn map(&mut self, dst: u8, map: &OwnedFd) -> &mut Self {
        self.raw(0x18, dst, BPF_PSEUDO_MAP_FD, 0, map.as_raw_fd())
            .raw(0, 0, 0, 0, 0)
    }
    fn finish(mut self) -> io::Result<Vec<[u8; 8]>> {
        for (at, label) in std::mem::take(&mut self.jumps) {
            let target = *self.labels.get(label).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("no label {label}"))
            })?;
            let off = i16::try_from(target as i64 - at as i64 - 1)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "jump too far"))?;
            self.code[at][2..4].copy_from_slice(&off.to_ne_bytes());
        }
        Ok(self.code)
    }
}

/// Copies the four tuple fields of a context (in `r6`) to the stack at `at`.
fn tuple_to_stack(a: &mut Asm, at: i16, fields: [i16; 4]) {
    for (i, field) in fields.into_iter().enumerate() {
        a.load32(R2, R6, field).store32(FP, at + 4 * i as i16, R2);
    }
}

/// `SOCK_OPS`: adds a newly established IPv4 socket of the proxy's own network namespace to
/// the `SOCKHASH` when it connected to a watched port (the client of a proxy port) or was
/// accepted on a watched address (a compute's own loopback address). The `ports` map holds
/// both kinds of key; they cannot collide (a port key's low half is zero, a 127.x.y.z address
/// key's low byte is 127). The namespace check is defence in depth: the program sees every
/// cgroup on the host, and a socket of another namespace (a container) may have the same
/// 4-tuple as a client of ours, while in the proxy's namespace an established 4-tuple is
/// unique. (On the kernel this was written on, 6.18, a socket of a namespace made with
/// `unshare(CLONE_NEWNET)` was not captured even without the check, so no test shows it.)
/// An entry is never replaced (`BPF_NOEXIST`).
fn sock_ops_program(
    ports: &OwnedFd,
    sockets: &OwnedFd,
    netns_cookie: u64,
) -> io::Result<Vec<[u8; 8]>> {
    let mut a = Asm::default();
    a.mov(R6, R1)
        .call(BPF_FUNC_GET_NETNS_COOKIE)
        .load_u64(R2, netns_cookie)
        .jne_reg(R0, R2, "out")
        .load32(R2, R6, OPS_FAMILY)
        .jne(R2, AF_INET, "out")
        .load32(R2, R6, OPS_OP)
        .load32(R3, R6, OPS_REMOTE_PORT)
        .jeq(R2, SOCK_OPS_ACTIVE_ESTABLISHED, "check")
        .load32(R3, R6, OPS_LOCAL_IP4)
        .jeq(R2, SOCK_OPS_PASSIVE_ESTABLISHED, "check")
        .ja("out")
        .label("check")
        .store32(FP, -4, R3)
        .map(R1, ports)
        .mov(R2, FP)
        .add_imm(R2, -4)
        .call(BPF_FUNC_MAP_LOOKUP_ELEM)
        .jeq(R0, 0, "out");
    tuple_to_stack(
        &mut a,
        -24,
        [
            OPS_LOCAL_IP4,
            OPS_REMOTE_IP4,
            OPS_LOCAL_PORT,
            OPS_REMOTE_PORT,
        ],
    );
    a.mov(R1, R6)
        .map(R2, sockets)
        .mov(R3, FP)
        .add_imm(R3, -24)
        .mov_imm(R4, BPF_NOEXIST)
        .call(BPF_FUNC_SOCK_HASH_UPDATE)
        .label("out")
        .mov_imm(R0, 1)
        .exit();
    a.finish()
}

/// Sends larger than this leave the shortcut for good (see [`sk_msg_program`]).
pub const BULK_SEND: i32 = 4096;

/// `SK_MSG`: a send on a socket of a joined pair goes into its peer's receive queue, and is
/// counted. A send larger than [`BULK_SEND`] unjoins the pair instead and takes the normal
/// path: a redirect into a receive queue has no flow control (the kernel only bounds the
/// host's total socket memory), so a bulk transfer (COPY, a large result) must go through the
/// proxy's sockets, where TCP's windows make the fast side wait. Leaving is safe at any
/// moment: a receiver reads its redirected queue before its TCP queue, so the order holds.
/// The program always returns `SK_PASS`; the kernel redirects when the helper chose a peer.
fn sk_msg_program(
    pairs: &OwnedFd,
    sockets: &OwnedFd,
    counters: &OwnedFd,
) -> io::Result<Vec<[u8; 8]>> {
    let mut a = Asm::default();
    a.mov(R6, R1)
        .load32(R2, R6, MSG_FAMILY)
        .jne(R2, AF_INET, "pass");
    tuple_to_stack(
        &mut a,
        -16,
        [
            MSG_LOCAL_IP4,
            MSG_REMOTE_IP4,
            MSG_LOCAL_PORT,
            MSG_REMOTE_PORT,
        ],
    );
    a.map(R1, pairs)
        .mov(R2, FP)
        .add_imm(R2, -16)
        .call(BPF_FUNC_MAP_LOOKUP_ELEM)
        .jeq(R0, 0, "pass")
        .mov(R7, R0)
        // The peer's tuple, copied to the stack (a helper's key argument).
        .load64(R2, R7, 0)
        .store64(FP, -32, R2)
        .load64(R2, R7, 8)
        .store64(FP, -24, R2)
        .load32(R2, R6, MSG_SIZE)
        .jgt(R2, BULK_SEND, "unjoin")
        // counters[direction] += size
        .load32(R2, R7, 16)
        .store32(FP, -36, R2)
        .map(R1, counters)
        .mov(R2, FP)
        .add_imm(R2, -36)
        .call(BPF_FUNC_MAP_LOOKUP_ELEM)
        .jeq(R0, 0, "redirect")
        .load32(R1, R6, MSG_SIZE)
        .atomic_add64(R0, 0, R1)
        .label("redirect")
        .mov(R1, R6)
        .map(R2, sockets)
        .mov(R3, FP)
        .add_imm(R3, -32)
        .mov_imm(R4, BPF_F_INGRESS)
        .call(BPF_FUNC_MSG_REDIRECT_HASH)
        .ja("pass")
        .label("unjoin")
        .map(R1, pairs)
        .mov(R2, FP)
        .add_imm(R2, -16)
        .call(BPF_FUNC_MAP_DELETE_ELEM)
        .map(R1, pairs)
        .mov(R2, FP)
        .add_imm(R2, -32)
        .call(BPF_FUNC_MAP_DELETE_ELEM)
        .label("pass")
        .mov_imm(R0, SK_PASS)
        .exit();
    a.finish()
}

fn load_program(kind: u32, program: &[[u8; 8]], name: &str) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    // prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, .., prog_name.
    let mut attr = Attr::new()
        .u32(0, kind)
        .u32(4, program.len() as u32)
        .u64(8, program.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    attr.0[48..64].copy_from_slice(&prog_name);
    bpf(BPF_PROG_LOAD, &mut attr).map(fd_of).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        io::Error::new(
            e.kind(),
            format!("loading the {name} program: {e}; verifier: {}", text.trim()),
        )
    })
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux 5.14).
fn own_netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let probe = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            probe.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("reading the network namespace's cookie: {e}"),
        ));
    }
    Ok(cookie)
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`).
fn cgroup2_root() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(path))
        })
        .min_by_key(|p| p.as_os_str().len())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 hierarchy is mounted"))
}

/// A `pairs` entry: where a joined socket's sends go, and which byte counter they add to.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Pair {
    peer: Tuple,
    direction: u32,
    _pad: u32,
}

/// Counter slots: bytes redirected from clients to computes, and back.
const CLIENT_TO_COMPUTE: u32 = 0;
const COMPUTE_TO_CLIENT: u32 = 1;

/// The host-wide half: maps, programs and the cgroup attachment. One per proxy; dropping it
/// detaches everything (the attachment is a BPF link owned by this process, so a killed
/// daemon leaves nothing behind either).
pub struct Shortcut {
    sockets: OwnedFd,
    pairs: OwnedFd,
    ports: OwnedFd,
    counters: OwnedFd,
    _sock_ops: OwnedFd,
    _sk_msg: OwnedFd,
    _link: OwnedFd,
}

impl Shortcut {
    pub fn install() -> io::Result<Shortcut> {
        let tuple = std::mem::size_of::<Tuple>() as u32;
        let pair = std::mem::size_of::<Pair>() as u32;
        let sockets = create_map(BPF_MAP_TYPE_SOCKHASH, tuple, 8, MAX_SOCKETS)?;
        let pairs = create_map(BPF_MAP_TYPE_HASH, tuple, pair, MAX_SOCKETS)?;
        let ports = create_map(BPF_MAP_TYPE_HASH, 4, 4, 16_384)?;
        let counters = create_map(BPF_MAP_TYPE_ARRAY, 4, 8, 2)?;
        let sock_ops = load_program(
            BPF_PROG_TYPE_SOCK_OPS,
            &sock_ops_program(&ports, &sockets, own_netns_cookie()?)?,
            "stemma_sockops",
        )?;
        let sk_msg = load_program(
            BPF_PROG_TYPE_SK_MSG,
            &sk_msg_program(&pairs, &sockets, &counters)?,
            "stemma_skmsg",
        )?;
        // target_fd (the map), attach_bpf_fd, attach_type.
        let mut attr = Attr::new()
            .u32(0, sockets.as_raw_fd() as u32)
            .u32(4, sk_msg.as_raw_fd() as u32)
            .u32(8, BPF_SK_MSG_VERDICT);
        bpf(BPF_PROG_ATTACH, &mut attr)
            .map_err(|e| io::Error::new(e.kind(), format!("attaching the SK_MSG program: {e}")))?;
        let root = cgroup2_root()?;
        let cgroup = std::fs::File::open(&root)?;
        // prog_fd, target_fd, attach_type, flags.
        let mut attr = Attr::new()
            .u32(0, sock_ops.as_raw_fd() as u32)
            .u32(4, cgroup.as_raw_fd() as u32)
            .u32(8, BPF_CGROUP_SOCK_OPS);
        let link = bpf(BPF_LINK_CREATE, &mut attr).map(fd_of).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("attaching the SOCK_OPS program to {}: {e}", root.display()),
            )
        })?;
        Ok(Shortcut {
            sockets,
            pairs,
            ports,
            counters,
            _sock_ops: sock_ops,
            _sk_msg: sk_msg,
            _link: link,
        })
    }

    /// Clients that connect to `port` (any local address) from now on can be joined.
    pub fn watch_listen_port(&self, port: u16) -> io::Result<()> {
        map_update(&self.ports, &remote_port_key(port), &1u32)
    }

    pub fn unwatch_listen_port(&self, port: u16) {
        let _ = map_delete(&self.ports, &remote_port_key(port));
    }

    /// Connections accepted on `addr` (a compute's own loopback address) from now on can be
    /// joined. Keyed by the address, not the port, so that no other server's sockets are
    /// touched.
    pub fn watch_compute(&self, addr: std::net::Ipv4Addr) -> io::Result<()> {
        map_update(&self.ports, &u32::from_ne_bytes(addr.octets()), &1u32)
    }

    /// Joins the client behind `client` (a socket the proxy accepted) with the compute behind
    /// `upstream` (the proxy's connection to the compute's TCP address). Call only while
    /// neither side has bytes in flight: from now on what either sends reaches the other
    /// directly. `None` when a side is not in the `SOCKHASH` (an IPv6 client, a client
    /// outside the cgroup hierarchy, an address not watched): the proxy relays that
    /// connection itself.
    pub fn join(
        self: &Arc<Self>,
        client: &std::net::TcpStream,
        upstream: &std::net::TcpStream,
    ) -> Option<Joined> {
        let v4 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        };
        // The far ends see the proxy's sockets' addresses the other way round.
        let from_client = Tuple::new(
            v4(client.peer_addr().ok()?)?,
            v4(client.local_addr().ok()?)?,
        );
        let from_compute = Tuple::new(
            v4(upstream.peer_addr().ok()?)?,
            v4(upstream.local_addr().ok()?)?,
        );
        if !map_contains(&self.sockets, &from_client) || !map_contains(&self.sockets, &from_compute)
        {
            return None;
        }
        let joined = Joined {
            shortcut: self.clone(),
            ends: [from_client, from_compute],
        };
        let pair = |peer, direction| Pair {
            peer,
            direction,
            _pad: 0,
        };
        map_update(
            &self.pairs,
            &from_client,
            &pair(from_compute, CLIENT_TO_COMPUTE),
        )
        .ok()?;
        map_update(
            &self.pairs,
            &from_compute,
            &pair(from_client, COMPUTE_TO_CLIENT),
        )
        .ok()?;
        Some(joined)
    }

    /// Bytes redirected so far: (client to compute, compute to client).
    pub fn bytes(&self) -> (u64, u64) {
        let read = |slot: u32| {
            let mut value = 0u64;
            let mut attr = Attr::new()
                .u32(0, self.counters.as_raw_fd() as u32)
                .u64(8, &slot as *const u32 as u64)
                .u64(16, &mut value as *mut u64 as u64);
            bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)
                .map(|_| value)
                .unwrap_or(0)
        };
        (read(CLIENT_TO_COMPUTE), read(COMPUTE_TO_CLIENT))
    }
}

/// A joined connection; dropping it sends further bytes through the proxy's sockets again.
pub struct Joined {
    shortcut: Arc<Shortcut>,
    ends: [Tuple; 2],
}

impl Joined {
    /// Whether the kernel still redirects (a bulk send unjoins the pair from inside).
    pub fn is_joined(&self) -> bool {
        map_contains(&self.shortcut.pairs, &self.ends[0])
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        for end in &self.ends {
            let _ = map_delete(&self.shortcut.pairs, end);
        }
    }
}
