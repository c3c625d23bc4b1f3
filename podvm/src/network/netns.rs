//! Network namespaces: run work inside one without moving the caller.
//!
//! A network namespace is a property of an OS thread. Entering one with
//! `setns(2)` from a tokio worker would leave that worker, and every task
//! it later runs, in the wrong namespace. So everything here happens on a
//! dedicated thread that enters the namespace, does its work and exits:
//!
//! - [`Netns::run`]: a closure on that thread (blocking the caller until it
//!   returns); [`Netns::run_async`] is the same for async callers.
//! - [`Netns::netlink`]: an `rtnetlink` handle whose netlink socket was
//!   created on that thread, so it talks to that namespace's kernel tables
//!   for its whole life; its connection task runs on the caller's tokio
//!   runtime, and the handle may be used from any thread or task.
//! - [`Netns::command_output`]: a program (e.g. `iptables`) started from
//!   that thread; a child inherits its creator thread's namespaces.
//!
//! Opening a namespace keeps a file descriptor on it, so a [`Netns`] stays
//! valid even if its bind mount (`/var/run/netns/NAME`) is removed.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::sched::{CloneFlags, setns};

/// The calling process's own network namespace (the host's, for the
/// daemon).
pub const SELF_NETNS: &str = "/proc/self/ns/net";

/// What went wrong; each names the namespace by the path it was opened
/// from.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace's path does not exist (e.g. the CNI already removed
    /// the pod's namespace).
    #[error("The network namespace {path} does not exist")]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The path exists but cannot be opened.
    #[error("Cannot open the network namespace {path}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `setns(2)` refused it: not a network namespace, or no
    /// `CAP_SYS_ADMIN`.
    #[error("Cannot enter the network namespace {path}")]
    Enter {
        /// The path given.
        path: PathBuf,
        /// The cause.
        source: nix::Error,
    },
    /// The dedicated thread could not be started.
    #[error("Cannot start a thread for the network namespace {path}")]
    Thread {
        /// The path given.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The closure panicked on the namespace's thread.
    #[error("The work run inside the network namespace {path} panicked")]
    Panicked {
        /// The path given.
        path: PathBuf,
    },
    /// [`Netns::netlink`] was called outside a tokio runtime.
    #[error("A netlink handle for {path} needs a tokio runtime, and none is current")]
    NoRuntime {
        /// The path given.
        path: PathBuf,
    },
    /// The netlink socket could not be created.
    #[error("Cannot open a netlink socket in the network namespace {path}")]
    Netlink {
        /// The path given.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The program could not be started (e.g. it is not installed).
    #[error("Cannot run {program} in the network namespace {path}")]
    Command {
        /// The program.
        program: String,
        /// The path given.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    /// Keeps the namespace alive and is what `setns(2)` enters.
    fd: OwnedFd,
    /// Where it was opened from; for messages only.
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path` (e.g. `/var/run/netns/cni-…`,
    /// `/proc/PID/ns/net`, [`SELF_NETNS`]).
    ///
    /// # Errors
    /// [`NetnsError::NotFound`] when the path does not exist,
    /// [`NetnsError::Open`] when it cannot be opened. Whether it is a
    /// network namespace shows only on first use ([`NetnsError::Enter`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetnsError> {
        let path = path.as_ref().to_path_buf();
        match File::open(&path) {
            Ok(file) => Ok(Self {
                fd: file.into(),
                path,
            }),
            Err(source) if source.kind() == io::ErrorKind::NotFound => {
                Err(NetnsError::NotFound { path })
            }
            Err(source) => Err(NetnsError::Open { path, source }),
        }
    }

    /// Wraps an already open namespace file descriptor; `label` names it in
    /// messages.
    #[must_use]
    pub fn from_fd(fd: OwnedFd, label: impl Into<PathBuf>) -> Self {
        Self {
            fd,
            path: label.into(),
        }
    }

    /// The path it was opened from (or the label given to
    /// [`Netns::from_fd`]).
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on a new OS thread that has entered this namespace, and
    /// returns its result. Blocks the calling thread until `work` returns
    /// (from async code use [`Netns::run_async`]).
    ///
    /// # Errors
    /// [`NetnsError::Thread`], [`NetnsError::Enter`] (then `work` did not
    /// run), [`NetnsError::Panicked`].
    pub fn run<T, F>(&self, work: F) -> Result<T, NetnsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name("netns".to_owned())
                .spawn_scoped(scope, || {
                    setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET)?;
                    Ok(work())
                })
                .map_err(|source| NetnsError::Thread {
                    path: self.path.clone(),
                    source,
                })?;
            match thread.join() {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(source)) => Err(NetnsError::Enter {
                    path: self.path.clone(),
                    source,
                }),
                Err(_) => Err(NetnsError::Panicked {
                    path: self.path.clone(),
                }),
            }
        })
    }

    /// [`Netns::run`] for async callers: the caller's task waits without
    /// blocking its runtime thread.
    ///
    /// # Errors
    /// As [`Netns::run`].
    pub async fn run_async<T, F>(&self, work: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let fd = self.fd.try_clone().map_err(|source| NetnsError::Thread {
            path: self.path.clone(),
            source,
        })?;
        let netns = Self {
            fd,
            path: self.path.clone(),
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || netns.run(work))
            .await
            .map_err(|_| NetnsError::Panicked { path })?
    }

    /// Opens an `rtnetlink` handle whose socket lives in this namespace.
    /// The socket is created on the namespace's thread (a netlink socket
    /// stays in the namespace it was created in); its connection task is
    /// spawned on the current tokio runtime and ends when the last clone of
    /// the handle is dropped.
    ///
    /// Must be called inside a tokio runtime. Blocks the caller for the
    /// time it takes to start and join a thread (tens of microseconds).
    ///
    /// # Errors
    /// [`NetnsError::NoRuntime`], [`NetnsError::Netlink`], and those of
    /// [`Netns::run`].
    pub fn netlink(&self) -> Result<rtnetlink::Handle, NetnsError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetnsError::NoRuntime {
            path: self.path.clone(),
        })?;
        let reactor = runtime.clone();
        let (connection, handle, _) = self
            .run(move || {
                // The socket registers with the runtime's reactor when
                // created, so the runtime must be current on this thread.
                let _entered = reactor.enter();
                rtnetlink::new_connection()
            })?
            .map_err(|source| NetnsError::Netlink {
                path: self.path.clone(),
                source,
            })?;
        runtime.spawn(connection);
        Ok(handle)
    }

    /// Runs `command` to completion from the namespace's thread (so the
    /// child runs inside this namespace) and returns its output; a failed
    /// exit status is returned, not an error.
    ///
    /// # Errors
    /// [`NetnsError::Command`] when the program cannot be started, and
    /// those of [`Netns::run`].
    pub fn command_output(&self, command: &mut Command) -> Result<Output, NetnsError> {
        let program = command.get_program().to_string_lossy().into_owned();
        self.run(|| command.output())?
            .map_err(|source| NetnsError::Command {
                program,
                path: self.path.clone(),
                source,
            })
    }
}

/// The namespace's file descriptor, e.g. for `IFLA_NET_NS_FD` (moving a
/// link into this namespace with `LinkMessageBuilder::setns_by_fd`).
impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The namespace a thread is in, as the kernel names it
    /// (`net:[4026531840]`).
    fn current_netns() -> String {
        std::fs::read_link("/proc/thread-self/ns/net")
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_missing_path_is_not_found() {
        let err = Netns::open("/var/run/netns/does-not-exist-podvisor").unwrap_err();
        assert!(matches!(err, NetnsError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_namespace_cannot_be_entered() {
        let netns = Netns::open("/proc/self/status").unwrap();
        let err = netns.run(|| ()).unwrap_err();
        assert!(matches!(err, NetnsError::Enter { .. }), "{err}");
    }

    /// A fresh, empty network namespace, held by its fd only (no bind
    /// mount to clean up).
    fn fresh_netns() -> Netns {
        let fd = std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare (needs root)");
            File::open("/proc/thread-self/ns/net").expect("own netns")
        })
        .join()
        .expect("thread");
        Netns::from_fd(fd.into(), "fresh")
    }

    #[test]
    fn run_enters_the_namespace_and_leaves_the_caller_where_it_was() {
        let before = current_netns();
        let netns = fresh_netns();
        let inside = netns.run(current_netns).unwrap();
        assert_ne!(inside, before);
        assert!(inside.starts_with("net:["), "{inside}");
        assert_eq!(current_netns(), before);
    }

    #[test]
    fn a_command_runs_inside_the_namespace() {
        let netns = fresh_netns();
        let output = netns
            .command_output(Command::new("ip").args(["-o", "link", "show"]))
            .unwrap();
        assert!(output.status.success());
        let links = String::from_utf8_lossy(&output.stdout);
        assert_eq!(links.lines().count(), 1, "only lo: {links}");
    }

    #[test]
    fn a_panic_inside_is_an_error() {
        let netns = Netns::open(SELF_NETNS).unwrap();
        let err = netns.run(|| panic!("inside")).unwrap_err();
        assert!(matches!(err, NetnsError::Panicked { .. }), "{err}");
    }

    #[test]
    fn a_command_that_does_not_exist_is_an_error() {
        let netns = Netns::open(SELF_NETNS).unwrap();
        let err = netns
            .command_output(&mut Command::new("/nonexistent/podvisor-no-such-program"))
            .unwrap_err();
        assert!(matches!(err, NetnsError::Command { .. }), "{err}");
    }

    #[tokio::test]
    async fn netlink_talks_to_the_namespace_and_needs_a_runtime() {
        use futures_util::TryStreamExt;
        let netns = fresh_netns();
        let handle = netns.netlink().unwrap();
        // Used from another task: the socket stays in the namespace.
        let links: Vec<_> =
            tokio::spawn(
                async move { handle.link().get().execute().try_collect::<Vec<_>>().await },
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(links.len(), 1, "a fresh namespace has only lo");
        let err = std::thread::spawn(move || netns.netlink().map(|_| ()))
            .join()
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, NetnsError::NoRuntime { .. }), "{err}");
    }
}
