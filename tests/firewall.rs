//! Where the nftables accept must go: with a host ruleset whose input chain drops by default,
//! `deploy/nftables-gnomon.conf` alone lets nothing through (an accept in a table of its own
//! would not either), and the rule its comments give for the host's own chain does. Run in a
//! network namespace of gnomon's own, so the host's firewall is never touched.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const NFT: &str = "/usr/sbin/nft";
const CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nftables-gnomon.conf");

/// A host firewall as many are set up: the input chain drops what it does not accept.
const HOST_RULESET: &str = "table inet filter {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
  }
}
";

/// The `nft insert rule ...` line that the file tells the operator to run.
fn documented_rule() -> String {
    let conf = std::fs::read_to_string(CONF).unwrap();
    conf.lines()
        .map(|l| l.trim_start_matches('#').trim())
        .find(|l| l.starts_with("nft insert rule inet filter input"))
        .expect("nftables-gnomon.conf gives no `nft insert rule inet filter input ...`")
        .to_string()
}

#[test]
fn the_accept_goes_in_the_hosts_own_input_chain() {
    if !is_root() {
        skip("a network namespace with its own nftables ruleset needs root");
        return;
    }
    if !have_tool("/usr/bin/unshare") || !have_tool("/usr/bin/nsenter") || !have_tool("/usr/sbin/ip") || !have_tool(NFT)
    {
        return;
    }
    let rule = documented_rule();
    let dir = tempdir("nft");
    let host = dir.join("host.nft");
    std::fs::write(&host, HOST_RULESET).unwrap();
    let setup = format!(
        "ip link set lo up && nft -f {} && nft -f {CONF} && exec \"$0\" \"$@\"",
        host.display()
    );
    let srv = Gnomon::start_via(
        &["unshare", "--net", "sh", "-c", &setup],
        "listen = [\"127.0.0.1:123\"]\nlocal_stratum = 10\n",
        &[],
    );
    let in_netns = |args: &[&str]| {
        let pid = srv.child.id().to_string();
        run_bounded(
            Command::new("nsenter").args(["-t", &pid, "-n"]).args(args),
            Duration::from_secs(10),
        )
    };
    let query = || in_netns(&[GNOMON, "query", "127.0.0.1", "--timeout", "0.3"]);

    let (ok, out) = query();
    assert!(!ok, "answered through the host's drop policy:\n{out}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(srv.counter("received"), 0, "the request reached gnomon");

    let (ok, out) = in_netns(&["sh", "-c", &rule]);
    assert!(ok, "{rule}: {out}");
    // Now gnomon gets the request and answers. (The reply does not get back to this client: on
    // loopback it meets the same input chain, untracked, so `established` does not accept it;
    // a remote client's host is not this one.)
    let _ = query();
    assert!(
        srv.wait_counter("received", 1) >= 1,
        "no request reached gnomon after `{rule}`"
    );
    assert!(srv.wait_counter("answered", 1) >= 1);
}
