//! The plain TCP copy baseline of `benches/p2p.sh`: a file's bytes over one TCP connection,
//! written to a file on the other side.
//!
//! ```text
//! tcp_copy serve FILE --listen ADDR     # prints "listening HOST:PORT", then serves FILE to
//!                                       # every connection, one after the other, until killed
//! tcp_copy fetch ADDR --output FILE [--fsync] [--blake3]
//! ```
//!
//! `fetch` reads until the server closes the connection and writes each buffer to the output
//! file as it arrives. `--fsync` adds `fsync` of the output before the clock stops (a durable
//! copy); `--blake3` hashes the bytes on receipt on the receiving thread (one core, like a
//! receiver that verifies inline). It prints one line:
//! `tcp_copy_result bytes=N seconds=S mb_per_s=R fsync=BOOL blake3=HEX|none`.
//!
//! Deliberately plain: `read`/`write` with a [`BUFFER_BYTES`] buffer on both sides, default
//! socket options, no `sendfile`/`splice`, no threads. It is the yardstick a transfer tool is
//! measured against, not a tuned transfer tool.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Instant;

/// Bytes per `read`/`write` call on both sides.
const BUFFER_BYTES: usize = 4 * 1024 * 1024;

fn usage() -> ExitCode {
    eprintln!("usage: tcp_copy serve FILE --listen ADDR");
    eprintln!("       tcp_copy fetch ADDR --output FILE [--fsync] [--blake3]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve", file, "--listen", listen] => serve(file, listen),
        ["fetch", address, "--output", output, flags @ ..] => {
            let mut fsync = false;
            let mut hash = false;
            for flag in flags {
                match *flag {
                    "--fsync" => fsync = true,
                    "--blake3" => hash = true,
                    _ => return usage(),
                }
            }
            fetch(address, output, fsync, hash)
        }
        _ => usage(),
    }
}

fn serve(path: &str, listen: &str) -> ExitCode {
    let listener = TcpListener::bind(listen).unwrap_or_else(|error| panic!("cannot listen on {listen}: {error}"));
    let local = listener.local_addr().expect("listener address");
    println!("listening {local}");
    std::io::stdout().flush().expect("flush stdout");
    let mut buffer = vec![0u8; BUFFER_BYTES];
    for connection in listener.incoming() {
        let mut stream = match connection {
            Ok(stream) => stream,
            Err(error) => {
                eprintln!("tcp_copy serve: accept failed: {error}");
                continue;
            }
        };
        let mut file = File::open(path).unwrap_or_else(|error| panic!("cannot open {path}: {error}"));
        let mut sent = 0u64;
        loop {
            let read = file.read(&mut buffer).unwrap_or_else(|error| panic!("cannot read {path}: {error}"));
            if read == 0 {
                break;
            }
            if let Err(error) = stream.write_all(&buffer[..read]) {
                eprintln!("tcp_copy serve: client went away after {sent} bytes: {error}");
                break;
            }
            sent += read as u64;
        }
        // Dropping the stream closes it: end of file for the client.
    }
    ExitCode::SUCCESS
}

fn fetch(address: &str, output: &str, fsync: bool, hash: bool) -> ExitCode {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address).unwrap_or_else(|error| panic!("cannot connect to {address}: {error}"));
    let mut file = File::create(output).unwrap_or_else(|error| panic!("cannot create {output}: {error}"));
    let mut hasher = hash.then(blake3::Hasher::new);
    let mut buffer = vec![0u8; BUFFER_BYTES];
    let mut received = 0u64;
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => panic!("cannot read from {address}: {error}"),
        };
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(&buffer[..read]);
        }
        file.write_all(&buffer[..read]).unwrap_or_else(|error| panic!("cannot write {output}: {error}"));
        received += read as u64;
    }
    if fsync {
        file.sync_all().unwrap_or_else(|error| panic!("cannot fsync {output}: {error}"));
    }
    let seconds = started.elapsed().as_secs_f64();
    let digest = hasher.map_or_else(|| "none".to_string(), |hasher| hasher.finalize().to_hex().to_string());
    println!(
        "tcp_copy_result bytes={received} seconds={seconds:.3} mb_per_s={:.1} fsync={fsync} blake3={digest}",
        received as f64 / seconds / 1e6
    );
    ExitCode::SUCCESS
}
