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

/// Thread (or process) id, name, and the clock ticks of CPU time it used (utime +
/// stime), from its `/proc/PID/stat` or `/proc/PID/task/TID/stat` line. The name is
/// in parentheses and may hold spaces and parentheses.
pub fn stat_cpu_ticks(stat: &str) -> Option<(u32, String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let id = stat[..open].trim().parse().ok()?;
    let name = stat[open + 1..close].to_string();
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let mut fields = stat[close + 1..].split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((id, name, utime + stime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn cpu_ticks_come_from_the_fields_after_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (CPU 0/TCG (x)) S 1 4242 4242 0 -1 4194368 100 0 0 0 731 52 0 0 20 0";
        assert_eq!(
            stat_cpu_ticks(stat),
            Some((4242, "CPU 0/TCG (x)".to_string(), 783))
        );
        assert_eq!(stat_cpu_ticks("4242 (qemu) S 1"), None);
    }

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
