//! Generates the Cap'n Proto bindings of `queueber.capnp` (needs the `capnp`
//! compiler; the README's commands install it).

fn main() {
    println!("cargo:rerun-if-changed=queueber.capnp");
    if let Err(e) = capnpc::CompilerCommand::new().file("queueber.capnp").run() {
        eprintln!("failed to compile queueber.capnp: {e}");
        eprintln!("install the Cap'n Proto compiler (Debian: apt-get install capnproto)");
        std::process::exit(1);
    }
}
