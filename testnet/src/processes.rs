//! Every child process of a trial, owned in one place so that none outlives the testnet.
//!
//! Children (moto, each `cachemeshd`) are spawned through [`Processes::spawn`], which puts
//! each in its own process group (a Ctrl-C on the terminal reaches only the testnet, which
//! then stops them in order), sets `kill_on_drop`, and on Linux asks the kernel to SIGKILL
//! the child if the testnet itself dies without cleaning up (`PR_SET_PDEATHSIG`, see
//! [`die_with_parent`]). The scenario code holds [`ProcessHandle`]s, never the children,
//! so dropping a scenario half-way (on a signal) leaves every child reachable here for
//! [`Processes::kill_all`].
//!
//! Non-goals: graceful shutdown. A trial's daemons are disposable; SIGKILL is the stop.
//!
//! Invariant: the registry's lock is a `std` mutex that is never held across an `.await`.

use std::io;
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// How often [`Processes::kill_all`] looks whether the children have exited.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// One spawned child, by its place in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessHandle(usize);

#[derive(Debug)]
struct Entry {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
}

/// The registry of children.
#[derive(Debug, Default)]
pub struct Processes {
    entries: Mutex<Vec<Entry>>,
}

impl Processes {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        // A panic while holding the lock leaves the list itself intact; keep using it so
        // that the children can still be killed.
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Spawns `command` as a child named `name` (for messages), in its own process group.
    pub fn spawn(&self, name: &str, mut command: Command) -> io::Result<ProcessHandle> {
        command.process_group(0).kill_on_drop(true);
        die_with_parent(&mut command);
        let child = command.spawn()?;
        let mut entries = self.lock();
        entries.push(Entry { name: name.to_string(), child, exited: None });
        Ok(ProcessHandle(entries.len() - 1))
    }

    /// The child's name.
    pub fn name(&self, handle: ProcessHandle) -> String {
        self.lock().get(handle.0).map(|entry| entry.name.clone()).unwrap_or_default()
    }

    /// Sends SIGKILL (nothing when it has already exited).
    pub fn kill(&self, handle: ProcessHandle) -> io::Result<()> {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(handle.0) else {
            return Ok(());
        };
        if entry.exited.is_some() {
            return Ok(());
        }
        match entry.child.start_kill() {
            Ok(()) => Ok(()),
            // Already reaped by tokio: nothing left to kill.
            Err(error) if error.kind() == io::ErrorKind::InvalidInput => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Sends SIGTERM, the signal a service manager stops a daemon with (nothing when it
    /// has already exited).
    #[allow(unsafe_code)]
    pub fn terminate(&self, handle: ProcessHandle) -> io::Result<()> {
        let entries = self.lock();
        let Some(entry) = entries.get(handle.0) else {
            return Ok(());
        };
        let Some(pid) = entry.child.id().filter(|_| entry.exited.is_none()) else {
            return Ok(());
        };
        // SAFETY: kill(2) with a pid this registry spawned and has not reaped (tokio reaps
        // only through try_wait/wait, which set `exited` or clear `id()` first).
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The exit status, when the child has exited (reaps it).
    pub fn try_wait(&self, handle: ProcessHandle) -> io::Result<Option<ExitStatus>> {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(handle.0) else {
            return Ok(None);
        };
        if entry.exited.is_none() {
            entry.exited = entry.child.try_wait()?;
        }
        Ok(entry.exited)
    }

    /// Waits (polling, at most `timeout`) until the child has exited.
    pub async fn wait_exit(&self, handle: ProcessHandle, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait(handle)? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(EXIT_POLL_INTERVAL).await;
        }
    }

    /// SIGKILLs every child still running and waits (at most `timeout`) until all have
    /// exited; returns the names of those that did not.
    pub async fn kill_all(&self, timeout: Duration) -> Vec<String> {
        let count = self.lock().len();
        for index in 0..count {
            // A failure to signal shows up below as a child that did not exit.
            let _ = self.kill(ProcessHandle(index));
        }
        let deadline = Instant::now() + timeout;
        let mut stuck = Vec::new();
        for index in 0..count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.wait_exit(ProcessHandle(index), left).await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => stuck.push(self.name(ProcessHandle(index))),
            }
        }
        stuck
    }
}

/// Asks the kernel to SIGKILL the child when the thread that spawned it exits.
///
/// `PR_SET_PDEATHSIG` fires when the spawning *thread* ends, not the process: it is set
/// only when spawning from the main thread (where the testnet runs its trial), because a
/// tokio worker or blocking thread may end while its children should live on. Children
/// spawned elsewhere rely on `kill_on_drop` and [`Processes::kill_all`] alone.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    if std::thread::current().name() != Some("main") {
        return;
    }
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec; it calls only prctl and
    // getppid, which are async-signal-safe, and touches no memory shared with the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::other("the testnet exited while starting this child"));
            }
            Ok(())
        });
    }
}
