//! ep-worker on two "hosts": each rank a process in a network namespace of its own, joined by a
//! veth pair, so the control plane crosses between two network stacks and addresses
//! (10.77.x.1 and 10.77.x.2), as between machines. allgather-rs runs and passes the oracle;
//! a peer-memory backend, whose ranks must share memory on one host, fails on both ranks within
//! the timeout, saying so. Needs root and iproute2's `ip`: elsewhere it is reported as ignored
//! with the reason, and `MOE_REQUIRE_NETNS=1` (set by `.ci/run`) makes that a failure.

use std::process::{Command, Output};
use std::thread;

use libtest_mimic::{Arguments, Failed, Trial};

fn main() {
    let args = Arguments::from_args();
    let skip = why_not_here();
    let required = std::env::var("MOE_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    let trials: Vec<Trial> = [
        (
            "allgather_rs_runs_across_two_network_namespaces",
            allgather_rs as fn() -> Result<(), Failed>,
        ),
        (
            "a_peer_memory_backend_across_namespaces_fails_on_both_ranks_saying_why",
            peer_memory,
        ),
    ]
    .into_iter()
    .map(|(name, run)| match (&skip, required) {
        (Some(reason), true) => {
            let reason = reason.clone();
            Trial::test(name, move || Err(format!("MOE_REQUIRE_NETNS=1, but: {reason}").into()))
        }
        (Some(reason), false) => Trial::test(format!("{name} [ignored: {reason}]"), run).with_ignored_flag(true),
        (None, _) => Trial::test(name, run),
    })
    .collect();
    libtest_mimic::run(&args, trials).exit();
}

/// Why network namespaces cannot be made here, or None.
fn why_not_here() -> Option<String> {
    let probe = format!("moe-probe-{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Err(e) => Some(format!("no `ip` command ({e}); install iproute2")),
        Ok(out) if !out.status.success() => Some(format!(
            "cannot create a network namespace (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).output();
            None
        }
    }
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct Hosts {
    names: [String; 2],
    addrs: [String; 2],
}

impl Hosts {
    fn new(tag: &str) -> Result<Hosts, Failed> {
        // Unique per test process and trial, so concurrent runs do not collide.
        let id = std::process::id();
        let names = [format!("moe-{tag}0-{id}"), format!("moe-{tag}1-{id}")];
        let subnet = format!("10.77.{}", id % 250);
        let addrs = [format!("{subnet}.1"), format!("{subnet}.2")];
        let hosts = Hosts { names, addrs };
        let links = [format!("mv{tag}0{}", id % 100_000), format!("mv{tag}1{}", id % 100_000)];
        let [n0, n1] = &hosts.names;
        let [l0, l1] = &links;
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", n0],
            vec!["netns", "add", n1],
            vec!["link", "add", l0, "type", "veth", "peer", "name", l1],
            vec!["link", "set", l0, "netns", n0],
            vec!["link", "set", l1, "netns", n1],
        ];
        for step in steps {
            ip(&step)?;
        }
        for (ns, (link, addr)) in hosts.names.iter().zip(links.iter().zip(&hosts.addrs)) {
            let cidr = format!("{addr}/24");
            ip(&["-n", ns, "addr", "add", &cidr, "dev", link])?;
            ip(&["-n", ns, "link", "set", link, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// ep-worker with `args` as rank `rank` of 2, in namespace `rank`, rank 0 at its address.
    fn run_ranks(&self, args: &[&str]) -> Vec<Output> {
        let port = "29533";
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", &self.names[rank], env!("CARGO_BIN_EXE_ep-worker")])
                    .args(args)
                    .env("MASTER_ADDR", &self.addrs[0])
                    .env("MASTER_PORT", port)
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", "2")
                    .env("LOCAL_RANK", "0")
                    .env("LOCAL_WORLD_SIZE", "1")
                    .env("MOE_TIMEOUT_MS", "5000");
                thread::spawn(move || command.output().expect("running ep-worker in a namespace"))
            })
            .collect();
        ranks.into_iter().map(|h| h.join().expect("rank thread")).collect()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it the other end.
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), Failed> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()).into())
    }
}

fn allgather_rs() -> Result<(), Failed> {
    let hosts = Hosts::new("a")?;
    for (r, out) in hosts
        .run_ranks(&["--backend", "allgather-rs", "--tokens", "8", "--calls", "2"])
        .iter()
        .enumerate()
    {
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!("rank {r} failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        for call in 0..2 {
            let line = format!("rank {r} of 2: call {call} of 8 via allgather-rs");
            if !stdout.lines().any(|l| l.starts_with(&line) && l.ends_with(": ok")) {
                return Err(format!("rank {r}: no passing call {call}:\n{stdout}").into());
            }
        }
    }
    Ok(())
}

fn peer_memory() -> Result<(), Failed> {
    let hosts = Hosts::new("p")?;
    let started = std::time::Instant::now();
    let outs = hosts.run_ranks(&["--backend", "nvlink-two-sided", "--tokens", "8", "--calls", "1"]);
    let took = started.elapsed();
    for (r, out) in outs.iter().enumerate() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return Err(format!("rank {r} succeeded across namespaces, where it shares no memory").into());
        }
        if !stderr.contains("must run on one host, in one network namespace") {
            return Err(format!("rank {r}'s error does not say why: {stderr}").into());
        }
    }
    if took > std::time::Duration::from_secs(15) {
        return Err(format!("the ranks took {took:?} to fail, past their 5 s timeout and its margin").into());
    }
    Ok(())
}
