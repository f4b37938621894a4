//! What access control costs: the per-request check a bound connection
//! makes (`Grant::allows`: permission bit, tenant, queue patterns), and the
//! once-per-connection token verification (SHA-256, constant-time compare).

use criterion::{criterion_group, criterion_main, Criterion};
use queueber::auth::{new_token, Permission, Tokens};
use queueber::names::QueueName;

fn auth(c: &mut Criterion) {
    let open = new_token("acme", &[Permission::Send, Permission::Consume], &[]).unwrap();
    let patterned = new_token(
        "acme",
        &[Permission::Send, Permission::Consume],
        &["orders.*".into(), "billing.*".into(), "audit".into()],
    )
    .unwrap();
    let tokens = Tokens::parse(&format!("{}\n{}", open.entry, patterned.entry), "bench").unwrap();
    let open_grant = tokens.verify(&open.secret).unwrap().clone();
    let patterned_grant = tokens.verify(&patterned.secret).unwrap().clone();
    let queue = QueueName::new("acme", "billing.eu-west.invoices").unwrap();

    let mut group = c.benchmark_group("auth");
    group.bench_function("allows_per_request_no_patterns", |b| {
        b.iter(|| open_grant.allows(Permission::Consume, Some(std::hint::black_box(&queue))))
    });
    group.bench_function("allows_per_request_3_patterns", |b| {
        b.iter(|| patterned_grant.allows(Permission::Consume, Some(std::hint::black_box(&queue))))
    });
    group.bench_function("verify_once_per_connection", |b| {
        b.iter(|| tokens.verify(std::hint::black_box(&open.secret)).is_some())
    });
    // A wrong secret and an unknown id of the same length must cost the same.
    let (id, secret) = open.secret.rsplit_once('.').unwrap();
    let wrong_secret = format!("{id}.{}", "0".repeat(secret.len()));
    let unknown_id = format!("{}.{secret}", "x".repeat(id.len()));
    group.bench_function("verify_wrong_secret", |b| {
        b.iter(|| tokens.verify(std::hint::black_box(&wrong_secret)).is_none())
    });
    group.bench_function("verify_unknown_id", |b| {
        b.iter(|| tokens.verify(std::hint::black_box(&unknown_id)).is_none())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(2));
    targets = auth
}
criterion_main!(benches);
