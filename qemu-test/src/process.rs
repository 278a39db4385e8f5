//! Starting QEMU so that it never outlives the program that started it.
//!
//! A test run that is killed, or a runner stopped with a signal, gets no chance to run
//! destructors; the kernel's parent-death signal ends QEMU then. Linux ties that signal
//! to the thread that forked, so every child is forked from one thread that lives as
//! long as the process: an appliance may be booted in one thread and used in another.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread;

use rustix::process::{Signal, getpid, getppid, set_parent_process_death_signal};

type Request = (Command, Sender<io::Result<Child>>);

/// Spawns `command` as a child that is killed when this process ends.
pub fn spawn_tied(mut command: Command) -> io::Result<Child> {
    let parent = getpid();
    // SAFETY: the closure runs in the child between fork and exec; it only makes the
    // async-signal-safe prctl and getppid system calls and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            set_parent_process_death_signal(Some(Signal::KILL))?;
            // The parent may have died before the signal was armed.
            if getppid() != Some(parent) {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((command, reply))
        .map_err(|_| io::Error::other("the process spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the process spawner thread is gone"))?
}

/// The thread every child is forked from.
fn spawner() -> &'static Mutex<Sender<Request>> {
    static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name(String::from("process spawner"))
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("starting the process spawner thread");
        Mutex::new(requests)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn children_outlive_the_thread_that_asked_for_them() {
        let child = thread::spawn(|| {
            let mut command = Command::new("sleep");
            command.arg("30").stdin(Stdio::null());
            spawn_tied(command).unwrap()
        })
        .join()
        .unwrap();
        let mut child = child;
        thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child died with its thread"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn spawn_errors_come_back() {
        let error = spawn_tied(Command::new("/nonexistent/program")).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
