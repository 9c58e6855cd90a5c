//! Latency between hosts without netem: every packet a host sends waits in a netfilter
//! queue, and the testnet lets it go once it has waited the chosen delay.
//!
//! Why not `tc netem`: many kernels (this project's CI among them) are built without it, and
//! no other qdisc on them delays packets (fq and etf, which honour departure times, are
//! missing too). What such kernels do have is `NFQUEUE`: an `iptables` rule in each node's
//! namespace sends the packets leaving the node's link to queue 0 of that namespace, and
//! [`Delayer`] holds each one for the delay before it accepts it; the packet then goes on
//! to the link's `tbf`, as it would after netem.
//!
//! The queue speaks netlink (`NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_QUEUE`); the few
//! messages needed (bind, copy mode, queue length, flags, batch verdict) are built here.
//! The kernel sends packet metadata only (`NFQNL_COPY_META`) and whole GSO packets, so a
//! packet costs a few hundred bytes of netlink whatever its size; verdicts go out in
//! batches (`NFQNL_MSG_VERDICT_BATCH` accepts every packet up to an id), since one delay
//! releases a queue's packets in the order they came.
//!
//! Precision: one thread serves every namespace's queue, waits with `ppoll` (a
//! high-resolution timer, no timer slack) and runs at real-time priority when it can, so it
//! wakes within tens of microseconds on a quiet machine. It stamps a packet when it reads it,
//! so time the packet waited in the kernel before that is added to the delay; the network
//! report gives the round trip measured with the delay in place and how late the thread's
//! releases were. The queue is fail-open: a packet that finds it full is sent at once
//! rather than dropped.
//!
//! Invariants: a queue's packets are released in arrival order, none before its delay is
//! up; when the delayer stops, every packet it holds is accepted first.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

/// The netfilter queue every node's rule sends its outgoing packets to (one per namespace).
pub const QUEUE_NUMBER: u16 = 0;
/// Packets a queue may hold before new ones bypass it (fail-open): far more than a 10 Gbit
/// link sends in 10 ms of 1500-byte packets.
const QUEUE_MAX_PACKETS: u32 = 16 * 1024;
/// How often the delayer looks at its stop flag when it holds nothing.
const IDLE_WAKE: Duration = Duration::from_millis(50);
/// Receive buffer of a queue's socket: room for bursts of packet messages.
const SOCKET_RECEIVE_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// One read from a queue's socket: hundreds of metadata-only packet messages.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// The real-time priority the delayer asks for (SCHED_FIFO, low: above every normal thread).
const REALTIME_PRIORITY: libc::c_int = 10;

// Netlink and nfnetlink_queue constants (linux/netlink.h, linux/netfilter/nfnetlink*.h).
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_HEADER_BYTES: usize = 16;
const NFGENMSG_BYTES: usize = 4;
const NLA_HEADER_BYTES: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NFQA_CFG_F_GSO: u32 = 4;
const NF_ACCEPT: u32 = 1;

/// The longest delay `--latency` takes.
pub const DELAY_MAX: Duration = Duration::from_secs(1);

/// Parses a delay such as `200us`, `0.2ms`, `5ms` or `1s` (`µs` is taken for `us`); at
/// most [`DELAY_MAX`], more than zero.
pub fn parse_delay(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a delay: write e.g. 200us, 0.2ms or 5ms"))?;
    let seconds = match unit.trim() {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "" => return Err(format!("`{text}` has no unit: write e.g. 200us, 0.2ms or 5ms")),
        other => return Err(format!("unknown unit `{other}` in `{text}`: use us, ms or s")),
    };
    let delay = Duration::try_from_secs_f64(seconds).map_err(|error| format!("`{text}`: {error}"))?;
    if delay.is_zero() || delay > DELAY_MAX {
        return Err(format!("`{text}` is out of range: more than 0 and at most {DELAY_MAX:?}"));
    }
    Ok(delay)
}

/// Appends one netlink attribute (header, payload, padding to 4 bytes).
fn put_attribute(message: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let length = (NLA_HEADER_BYTES + payload.len()) as u16;
    message.extend_from_slice(&length.to_ne_bytes());
    message.extend_from_slice(&kind.to_ne_bytes());
    message.extend_from_slice(payload);
    message.resize(message.len().next_multiple_of(4), 0);
}

/// One nfnetlink_queue message for `queue`: headers, then `attributes`.
fn message(kind: u16, flags: u16, sequence: u32, queue: u16, attributes: &[(u16, &[u8])]) -> Vec<u8> {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(&[0; 4]); // length, set below
    message.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    message.extend_from_slice(&flags.to_ne_bytes());
    message.extend_from_slice(&sequence.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    message.push(libc::AF_UNSPEC as u8); // nfgen_family
    message.push(0); // NFNETLINK_V0
    message.extend_from_slice(&queue.to_be_bytes()); // res_id
    for (kind, payload) in attributes {
        put_attribute(&mut message, *kind, payload);
    }
    let length = message.len() as u32;
    message[..4].copy_from_slice(&length.to_ne_bytes());
    message
}

/// The configuration messages that bind `queue`, ask for metadata only, bound its length
/// and make it fail-open and GSO-whole; each asks for an acknowledgement.
fn config_messages(queue: u16) -> Vec<Vec<u8>> {
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    let bind = [NFQNL_CFG_CMD_BIND, 0, 0, 0]; // command, pad, pf (unused since Linux 3.8)
    let mut params = 0u32.to_be_bytes().to_vec(); // copy_range
    params.push(NFQNL_COPY_META);
    let options = (NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO).to_be_bytes();
    vec![
        message(NFQNL_MSG_CONFIG, flags, 1, queue, &[(NFQA_CFG_CMD, &bind)]),
        message(NFQNL_MSG_CONFIG, flags, 2, queue, &[(NFQA_CFG_PARAMS, &params)]),
        message(NFQNL_MSG_CONFIG, flags, 3, queue, &[(NFQA_CFG_QUEUE_MAXLEN, &QUEUE_MAX_PACKETS.to_be_bytes())]),
        message(NFQNL_MSG_CONFIG, flags, 4, queue, &[(NFQA_CFG_FLAGS, &options), (NFQA_CFG_MASK, &options)]),
    ]
}

/// The message that accepts every packet of `queue` up to and including `id`.
fn accept_through(queue: u16, id: u32) -> Vec<u8> {
    let mut verdict = NF_ACCEPT.to_be_bytes().to_vec();
    verdict.extend_from_slice(&id.to_be_bytes());
    message(NFQNL_MSG_VERDICT_BATCH, NLM_F_REQUEST, 0, queue, &[(NFQA_VERDICT_HDR, &verdict)])
}

/// What one netlink message read from a queue socket says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Incoming {
    /// A queued packet and its id.
    Packet(u32),
    /// An acknowledgement (0) or error (a negative errno).
    Ack(i32),
    /// Anything else.
    Other,
}

/// Splits a buffer read from the socket into messages; a malformed tail ends the walk.
fn parse(buffer: &[u8]) -> Vec<Incoming> {
    let mut found = Vec::new();
    let mut at = 0;
    while buffer.len() >= at + NLMSG_HEADER_BYTES {
        let word = |offset: usize| {
            u32::from_ne_bytes([buffer[offset], buffer[offset + 1], buffer[offset + 2], buffer[offset + 3]])
        };
        let length = word(at) as usize;
        if length < NLMSG_HEADER_BYTES || at + length > buffer.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buffer[at + 4], buffer[at + 5]]);
        let body = &buffer[at + NLMSG_HEADER_BYTES..at + length];
        found.push(if kind == NLMSG_ERROR && body.len() >= 4 {
            Incoming::Ack(i32::from_ne_bytes([body[0], body[1], body[2], body[3]]))
        } else if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
            packet_id(body).map_or(Incoming::Other, Incoming::Packet)
        } else {
            Incoming::Other
        });
        at += length.next_multiple_of(4);
    }
    found
}

/// The packet id in a packet message's body (after the netlink header).
fn packet_id(body: &[u8]) -> Option<u32> {
    let mut at = NFGENMSG_BYTES;
    while body.len() >= at + NLA_HEADER_BYTES {
        let length = u16::from_ne_bytes([body[at], body[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([body[at + 2], body[at + 3]]) & NLA_TYPE_MASK;
        if length < NLA_HEADER_BYTES || at + length > body.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR && length >= NLA_HEADER_BYTES + 4 {
            let id = &body[at + NLA_HEADER_BYTES..at + NLA_HEADER_BYTES + 4];
            return Some(u32::from_be_bytes([id[0], id[1], id[2], id[3]]));
        }
        at += length.next_multiple_of(4);
    }
    None
}

/// Runs `make` on a thread that has joined the network namespace `namespace` (made by `ip
/// netns add`): sockets it opens stay in that namespace wherever they are used.
#[allow(unsafe_code)]
pub fn in_namespace<T: Send>(namespace: &str, make: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let handle = File::open(format!("/run/netns/{namespace}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns with a valid namespace descriptor, which stays open for the
                // call; CLONE_NEWNET moves only this thread, which ends when `make` returns.
                if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                make()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// One namespace's queue: its socket and the packets it holds, oldest first.
#[derive(Debug)]
pub struct Queue {
    socket: Socket,
    held: VecDeque<(Instant, u32)>,
}

impl Queue {
    /// Opens and configures queue [`QUEUE_NUMBER`] of the namespace the calling thread is
    /// in (see [`in_namespace`]).
    pub fn open_here() -> io::Result<Self> {
        let socket =
            Socket::new(Domain::from(libc::AF_NETLINK), Type::RAW, Some(Protocol::from(libc::NETLINK_NETFILTER)))?;
        socket.set_recv_buffer_size(SOCKET_RECEIVE_BUFFER_BYTES)?;
        let mut queue = Self { socket, held: VecDeque::new() };
        for config in config_messages(QUEUE_NUMBER) {
            (&queue.socket).write_all(&config)?;
            queue.await_ack()?;
        }
        queue.socket.set_nonblocking(true)?;
        Ok(queue)
    }

    /// Reads until the kernel acknowledges the last request (blocking socket).
    fn await_ack(&mut self) -> io::Result<()> {
        let mut buffer = vec![0u8; READ_BUFFER_BYTES];
        loop {
            let read = (&self.socket).read(&mut buffer)?;
            for incoming in parse(&buffer[..read]) {
                match incoming {
                    Incoming::Ack(0) => return Ok(()),
                    Incoming::Ack(error) => return Err(io::Error::from_raw_os_error(-error)),
                    Incoming::Packet(_) | Incoming::Other => {}
                }
            }
        }
    }

    /// Reads every packet message waiting, to be released at `release_at`.
    fn take_arrivals(&mut self, buffer: &mut [u8], release_at: Instant) -> io::Result<()> {
        loop {
            let read = match (&self.socket).read(buffer) {
                Ok(0) => return Ok(()),
                Ok(read) => read,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                // The socket's buffer overflowed and some packet messages were lost; their
                // packets wait in the kernel's queue and go with the next batch verdict,
                // which accepts every id up to its own.
                Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(error) => return Err(error),
            };
            for incoming in parse(&buffer[..read]) {
                if let Incoming::Packet(id) = incoming {
                    self.held.push_back((release_at, id));
                }
            }
        }
    }

    /// Accepts every held packet due by `now` in one verdict; returns how many, and the
    /// lateness of the oldest (the most late).
    fn release_due(&mut self, now: Instant) -> io::Result<(u64, Duration)> {
        let Some(Due { last, count, late }) = take_due(&mut self.held, now) else {
            return Ok((0, Duration::ZERO));
        };
        (&self.socket).write_all(&accept_through(QUEUE_NUMBER, last))?;
        Ok((count, late))
    }

    fn next_release(&self) -> Option<Instant> {
        self.held.front().map(|(at, _)| *at)
    }
}

/// The packets [`take_due`] released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Due {
    /// The id of the last one: a batch verdict accepts every id up to it.
    last: u32,
    /// How many.
    count: u64,
    /// How late the oldest was.
    late: Duration,
}

/// Removes from `held` (oldest first) the packets whose release time is `now` or earlier;
/// None when there is none.
fn take_due(held: &mut VecDeque<(Instant, u32)>, now: Instant) -> Option<Due> {
    let count = held.partition_point(|(at, _)| *at <= now);
    let (oldest, _) = *held.front().filter(|_| count > 0)?;
    let (_, last) = held[count - 1];
    held.drain(..count);
    Some(Due { last, count: count as u64, late: now.saturating_duration_since(oldest) })
}

/// How the delayer did: packets delayed, and how late its releases were.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DelayFigures {
    /// Packets (GSO packets count once) held and released.
    pub packets: u64,
    /// Release rounds.
    pub releases: u64,
    /// Mean lateness of a release round (its oldest packet) past the delay, microseconds.
    pub late_mean_us: f64,
    /// Largest lateness of a release round past the delay, microseconds.
    pub late_max_us: f64,
    /// Whether the delay thread got real-time priority.
    pub realtime: bool,
    /// The error that stopped the delay thread early, if one did.
    pub error: Option<String>,
}

/// The thread holding every namespace's packets for the delay.
#[derive(Debug)]
pub struct Delayer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<DelayFigures>>,
    /// What the thread reported, once stopped.
    figures: Option<DelayFigures>,
}

impl Delayer {
    /// Starts holding the packets of `queues` for `delay` each.
    pub fn start(queues: Vec<Queue>, delay: Duration) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("testnet-delay".into())
            .spawn(move || delay_loop(queues, delay, &thread_stop))?;
        Ok(Self { stop, thread: Some(thread), figures: None })
    }

    /// Stops the thread (releasing every packet it holds); later calls do nothing.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            self.figures = Some(thread.join().unwrap_or_else(|_| DelayFigures {
                error: Some("the delay thread panicked".into()),
                ..DelayFigures::default()
            }));
        }
    }

    /// What the thread reported (None until [`Delayer::stop`]).
    pub fn figures(&self) -> Option<&DelayFigures> {
        self.figures.as_ref()
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asks for SCHED_FIFO and no timer slack for the calling thread; true when granted.
#[allow(unsafe_code)]
fn make_thread_prompt() -> bool {
    // SAFETY: prctl(PR_SET_TIMERSLACK) and sched_setscheduler(0, ...) act on the calling
    // thread only; `param` is a valid sched_param for the call.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
        let param = libc::sched_param { sched_priority: REALTIME_PRIORITY };
        libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (high-resolution timer).
#[allow(unsafe_code)]
fn wait_readable(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length,
    // `timeout` a valid timespec, and no signal mask is passed.
    let ready = unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, &timeout, std::ptr::null()) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(())
}

fn delay_loop(mut queues: Vec<Queue>, delay: Duration, stop: &AtomicBool) -> DelayFigures {
    let mut figures = DelayFigures { realtime: make_thread_prompt(), ..DelayFigures::default() };
    let mut late_total = Duration::ZERO;
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let raw: Vec<RawFd> = queues.iter().map(|queue| queue.socket.as_raw_fd()).collect();
    let mut fds: Vec<libc::pollfd> =
        raw.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let mut run = || -> io::Result<()> {
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            for queue in &mut queues {
                let (released, late) = queue.release_due(now)?;
                if released > 0 {
                    figures.packets += released;
                    figures.releases += 1;
                    late_total += late;
                    figures.late_max_us = figures.late_max_us.max(late.as_secs_f64() * 1e6);
                }
            }
            let next = queues.iter().filter_map(Queue::next_release).min();
            let timeout = next.map_or(IDLE_WAKE, |at| at.saturating_duration_since(Instant::now()).min(IDLE_WAKE));
            for fd in &mut fds {
                fd.revents = 0;
            }
            wait_readable(&mut fds, timeout)?;
            let arrived = Instant::now() + delay;
            for (queue, fd) in queues.iter_mut().zip(&fds) {
                if fd.revents != 0 {
                    queue.take_arrivals(&mut buffer, arrived)?;
                }
            }
        }
        Ok(())
    };
    if let Err(error) = run() {
        eprintln!("cachemesh-testnet: the delay thread stopped: {error}");
        figures.error = Some(format!("the delay thread stopped early: {error}"));
    }
    // Let everything held go before the sockets close (closing drops what a queue holds).
    let far = Instant::now() + Duration::from_secs(3600);
    for queue in &mut queues {
        let _ = queue.release_due(far);
    }
    if figures.releases > 0 {
        figures.late_mean_us = late_total.as_secs_f64() * 1e6 / figures.releases as f64;
    }
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(bytes: &[u8], at: usize) -> (u16, u16, &[u8]) {
        let length = u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
        let kind = u16::from_ne_bytes([bytes[at + 2], bytes[at + 3]]);
        (length, kind, &bytes[at + 4..at + length as usize])
    }

    #[test]
    fn packets_leave_in_order_and_none_before_its_time() {
        let start = Instant::now();
        let at = |micros: u64| start + Duration::from_micros(micros);
        let mut held: VecDeque<(Instant, u32)> = [(at(100), 7), (at(150), 8), (at(300), 9)].into();
        assert_eq!(take_due(&mut held, at(99)), None, "nothing is due before its time");
        assert_eq!(held.len(), 3);
        let due = take_due(&mut held, at(160)).unwrap();
        assert_eq!(due, Due { last: 8, count: 2, late: Duration::from_micros(60) });
        assert_eq!(held, VecDeque::from([(at(300), 9)]), "the later packet stays");
        assert_eq!(take_due(&mut held, at(300)).map(|due| due.last), Some(9), "due exactly at its time");
        assert!(held.is_empty());
        assert_eq!(take_due(&mut held, at(1000)), None);
    }

    #[test]
    fn delays_parse_in_micro_and_milliseconds_and_refuse_nonsense() {
        assert_eq!(parse_delay("200us"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_delay("200µs"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_delay("0.2ms"), Ok(Duration::from_micros(200)));
        assert_eq!(parse_delay("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_delay("1s"), Ok(Duration::from_secs(1)));
        for bad in ["", "200", "ms", "0ms", "2s", "1.2.3ms", "5 parsecs", "-1ms"] {
            assert!(parse_delay(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn verdicts_accept_every_packet_up_to_an_id_of_one_queue() {
        let bytes = accept_through(7, 0x0102_0304);
        assert_eq!(bytes.len(), 16 + 4 + 12);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize, bytes.len());
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x0303, "subsystem 3, VERDICT_BATCH");
        assert_eq!(u16::from_ne_bytes([bytes[6], bytes[7]]), NLM_F_REQUEST);
        assert_eq!(&bytes[18..20], &7u16.to_be_bytes(), "queue number, big-endian");
        let (length, kind, payload) = attribute(&bytes, 20);
        assert_eq!((length, kind), (12, NFQA_VERDICT_HDR));
        assert_eq!(payload, &[0, 0, 0, 1, 1, 2, 3, 4], "NF_ACCEPT then the id, big-endian");
    }

    #[test]
    fn configuration_binds_copies_metadata_and_fails_open() {
        let messages = config_messages(0);
        assert_eq!(messages.len(), 4);
        for message in &messages {
            assert_eq!(u16::from_ne_bytes([message[4], message[5]]), 0x0302, "subsystem 3, CONFIG");
            assert_eq!(u16::from_ne_bytes([message[6], message[7]]), NLM_F_REQUEST | NLM_F_ACK);
            assert_eq!(message.len() % 4, 0);
        }
        assert_eq!(attribute(&messages[0], 20), (8, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0][..]));
        let (length, kind, params) = attribute(&messages[1], 20);
        assert_eq!((length, kind, params), (9, NFQA_CFG_PARAMS, &[0, 0, 0, 0, NFQNL_COPY_META][..]));
        assert_eq!(messages[1].len(), 20 + 12, "the 5-byte payload is padded");
        let flags = (NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO).to_be_bytes();
        assert_eq!(attribute(&messages[3], 20), (8, NFQA_CFG_FLAGS, &flags[..]));
        assert_eq!(attribute(&messages[3], 28), (8, NFQA_CFG_MASK, &flags[..]));
    }

    /// A packet message as the kernel sends it: another attribute first, then the header.
    fn packet_message(id: u32) -> Vec<u8> {
        let mut header = id.to_be_bytes().to_vec();
        header.extend_from_slice(&[0x08, 0x00, 3]); // hw_protocol, hook
        message(NFQNL_MSG_PACKET, 0, 0, 0, &[(11, &[1, 2, 3, 4, 5]), (NFQA_PACKET_HDR | 0x8000, &header)])
    }

    #[test]
    fn packets_and_acknowledgements_are_read_from_one_buffer() {
        let mut buffer = packet_message(41);
        buffer.extend(packet_message(42));
        let mut error = vec![0u8; 36];
        error[0..4].copy_from_slice(&36u32.to_ne_bytes());
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        buffer.extend(&error);
        assert_eq!(parse(&buffer), vec![Incoming::Packet(41), Incoming::Packet(42), Incoming::Ack(-1)]);
    }

    #[test]
    fn malformed_messages_end_the_walk_without_panicking() {
        let whole = packet_message(9);
        for cut in 0..whole.len() {
            let found = parse(&whole[..cut]);
            assert!(found.is_empty(), "a message cut at {cut} bytes must not be read");
        }
        let mut lying = packet_message(9);
        lying[0..4].copy_from_slice(&3u32.to_ne_bytes()); // shorter than a header
        assert!(parse(&lying).is_empty());
        let mut bad_attribute = packet_message(9);
        bad_attribute[20..22].copy_from_slice(&200u16.to_ne_bytes()); // runs past the message
        assert_eq!(parse(&bad_attribute), vec![Incoming::Other]);
    }
}
