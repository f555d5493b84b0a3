//! Bench helper (benches/xdp.sh, INJECT=xdp): holds an XDP program on interface FROM that sends
//! every frame on to interface TO, so that TO's veth peer receives them as XDP frames, as from a
//! NIC, and not as skbs. Runs until killed; the kernel detaches the program when it exits.

use gnomon::xdp::sys::{Mode, Redirect};
use std::process::exit;

fn ifindex(name: &str) -> u32 {
    let path = format!("/sys/class/net/{name}/ifindex");
    match std::fs::read_to_string(&path).map(|s| s.trim().parse()) {
        Ok(Ok(i)) => i,
        _ => {
            eprintln!("xdp_redirect: no interface {name} ({path})");
            exit(1)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [from, to] = args.as_slice() else {
        eprintln!("usage: xdp_redirect FROM TO   (every frame FROM receives goes out of TO)");
        exit(2)
    };
    let (from_index, to_index) = (ifindex(from), ifindex(to));
    let program = Redirect::load(to_index).unwrap_or_else(|e| {
        eprintln!("xdp_redirect: {e}");
        exit(1)
    });
    let _link = program.attach(from_index, Mode::Native).unwrap_or_else(|e| {
        eprintln!("xdp_redirect: attaching to {from}: {e}");
        exit(1)
    });
    println!("xdp_redirect: {from} -> {to}");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
