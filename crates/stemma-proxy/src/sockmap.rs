//! Client-to-compute bytes forwarded inside the kernel (Linux sockmap), so that no proxy thread
//! wakes up for a query.
//!
//! Measured with `bench/relay.py` on 2 cores: every byte a userspace relay forwards costs a
//! thread wake-up, and pgbench select-only through the proxy spent about 33 µs more CPU per
//! transaction than on the Unix socket (two wake-ups per round trip). With the upstream half
//! redirected here, one wake-up per round trip remains (the downstream one, which must stay in
//! userspace: see below) and the cost falls by about a third.
//!
//! How: each relayed connection gets two one-slot `SOCKMAP`s, one holding the client's TCP
//! socket (with a verdict program attached) and one holding the compute's Unix socket, and a
//! six-instruction `SK_SKB` verdict program that sends every segment the client socket
//! receives out of the Unix socket (`bpf_sk_redirect_map(skb, map, 0, 0)`). The program is
//! written out as instructions below rather than compiled: it needs no BPF toolchain (clang,
//! bpf-linker) and no crate beyond `libc`.
//!
//! Only this direction: compute-to-client traffic must be seen whole (message framing for a
//! FATAL ErrorResponse on reset or delete, BackendKeyData for cancels), and a Unix socket has
//! no stream parser that could cut it at message boundaries in the kernel.
//!
//! Needs CAP_NET_ADMIN (the daemon runs as root in production) and Linux 5.15 or later (Unix
//! stream sockets in a sockmap). When any step fails, the caller relays in userspace instead.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

// From <linux/bpf.h>; stable kernel ABI.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_SKB: u32 = 14;
const BPF_SK_SKB_VERDICT: u32 = 38;
const BPF_FUNC_SK_REDIRECT_MAP: i32 = 52;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_ANY: u64 = 0;

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

/// A one-slot sockmap.
fn sockmap() -> io::Result<OwnedFd> {
    // map_type, key_size, value_size, max_entries.
    let mut attr = Attr::new()
        .u32(0, BPF_MAP_TYPE_SOCKMAP)
        .u32(4, 4)
        .u32(8, 4)
        .u32(12, 1);
    bpf(BPF_MAP_CREATE, &mut attr).map(fd_of)
}

fn put(map: &OwnedFd, socket: BorrowedFd<'_>) -> io::Result<()> {
    let key: u32 = 0;
    let value: u32 = socket.as_raw_fd() as u32;
    // map_fd, key, value, flags.
    let mut attr = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, &key as *const u32 as u64)
        .u64(16, &value as *const u32 as u64)
        .u64(24, BPF_ANY);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// One `struct bpf_insn`: opcode, dst and src registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0x0f);
    b[2..4].copy_from_slice(&off.to_ne_bytes());
    b[4..8].copy_from_slice(&imm.to_ne_bytes());
    b
}

/// The verdict program: `return bpf_sk_redirect_map(skb, target, 0, 0);`. A redirect to
/// a socket's egress sends the bytes out of it, as if written by the proxy.
fn verdict_program(target: &OwnedFd) -> io::Result<OwnedFd> {
    let program: [[u8; 8]; 6] = [
        // r2 = the target map (a 16-byte load: the map's fd, then a zero half).
        insn(0x18, 2, BPF_PSEUDO_MAP_FD, 0, target.as_raw_fd()),
        insn(0, 0, 0, 0, 0),
        // r3 = 0 (the slot), r4 = 0 (flags: egress); r1 is still the skb.
        insn(0xb7, 3, 0, 0, 0),
        insn(0xb7, 4, 0, 0, 0),
        // call bpf_sk_redirect_map; exit with its verdict.
        insn(0x85, 0, 0, 0, BPF_FUNC_SK_REDIRECT_MAP),
        insn(0x95, 0, 0, 0, 0),
    ];
    let license = c"GPL";
    // prog_type, insn_cnt, insns, license.
    let mut attr = Attr::new()
        .u32(0, BPF_PROG_TYPE_SK_SKB)
        .u32(4, program.len() as u32)
        .u64(8, program.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64);
    bpf(BPF_PROG_LOAD, &mut attr).map(fd_of)
}

/// While alive, everything the client socket receives goes straight to the compute's socket.
/// Dropping it closes the maps and the program, which takes both sockets out of the kernel's
/// redirect; the sockets themselves stay open.
pub(crate) struct Redirect {
    _client_map: OwnedFd,
    _compute_map: OwnedFd,
    _program: OwnedFd,
}

impl Redirect {
    /// Redirects the bytes `client` (a connected TCP socket) receives from now on into
    /// `compute` (a connected Unix stream socket). Bytes already queued on `client` stay
    /// there, for a normal read.
    pub(crate) fn new(client: BorrowedFd<'_>, compute: BorrowedFd<'_>) -> io::Result<Redirect> {
        let client_map = sockmap()?;
        let compute_map = sockmap()?;
        let program = verdict_program(&compute_map)?;
        // The program must be attached before the socket enters the map to take effect.
        // target_fd, attach_bpf_fd, attach_type.
        let mut attr = Attr::new()
            .u32(0, client_map.as_raw_fd() as u32)
            .u32(4, program.as_raw_fd() as u32)
            .u32(8, BPF_SK_SKB_VERDICT);
        bpf(BPF_PROG_ATTACH, &mut attr)?;
        put(&compute_map, compute)?;
        put(&client_map, client)?;
        Ok(Redirect {
            _client_map: client_map,
            _compute_map: compute_map,
            _program: program,
        })
    }
}

/// Bytes the TCP socket has received in its life (`tcpi_bytes_received`), for the byte
/// metrics of a redirected connection.
pub(crate) fn tcp_bytes_received(socket: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_received)
}
