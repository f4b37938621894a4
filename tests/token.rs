//! `queueber token new` as an operator runs it: the secret alone on the
//! first line, and everything after it an auth file that verifies it.

use std::process::Command;

use queueber::auth::{Permission, Tokens};
use queueber::names::QueueName;

#[test]
fn token_new_prints_a_secret_and_an_auth_file_that_verifies_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_queueber"))
        .args([
            "token",
            "new",
            "--tenant",
            "acme",
            "--perms",
            "send,consume",
            "--queues",
            "orders.*",
        ])
        .output()
        .expect("queueber runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let (secret, file) = text.split_once('\n').expect("a first line");
    assert!(secret.len() > 64, "{secret:?}");
    assert!(!file.contains(secret), "the auth file must not hold the secret");
    let tokens = Tokens::parse(file, "tail -n +2").expect("a valid auth file");
    let id = file
        .lines()
        .find_map(|l| l.strip_prefix("id = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("an id line");
    assert!(secret.starts_with(&format!("{id}.")), "{secret} carries its id");
    let grant = tokens.verify(secret).expect("the printed secret verifies");
    assert_eq!(grant.tenant, "acme");
    assert!(grant.has(Permission::Send) && grant.has(Permission::Consume) && !grant.has(Permission::Admin));
    let orders = QueueName::new("acme", "orders.eu").unwrap();
    assert_eq!(grant.allows(Permission::Send, Some(&orders)), Ok(()));
    assert!(grant
        .allows(Permission::Send, Some(&QueueName::new("acme", "billing").unwrap()))
        .is_err());
    assert!(tokens.verify(&format!("{id}.not-the-secret")).is_none());
}

#[test]
fn token_new_refuses_unknown_permissions_and_bad_tenants() {
    for args in [
        ["token", "new", "--tenant", "acme", "--perms", "root"],
        ["token", "new", "--tenant", "bad tenant", "--perms", "send"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_queueber"))
            .args(args)
            .output()
            .expect("queueber runs");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "no secret printed on error");
    }
}
