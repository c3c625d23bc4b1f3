//! The fake provider passes the conformance suite: the tests and benchmarks
//! that stand it in for a cloud rely on a provider that keeps the contract.

use podvisor_providers::conformance::{Fixture, run};
use podvisor_providers::fake::FakeProvider;

#[tokio::test]
async fn fake_provider_passes_the_conformance_suite() {
    let fake = FakeProvider::new();
    run(&fake, &Fixture::new("node-a")).await;
    assert!(fake.is_empty(), "the suite leaves nothing behind");
}
