//! Broker round-trip latency: `cargo run --release -p forelock --example ping -- DIR [N]`.
fn main() -> Result<(), forelock::Error> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("runtime dir");
    let n: usize = args.next().map_or(20_000, |s| s.parse().expect("count"));
    let client = forelock::Client::connect_to(dir)?;
    let mut samples: Vec<u128> = (0..n)
        .map(|_| client.ping().map(|d| d.as_nanos()))
        .collect::<Result<_, _>>()?;
    samples.sort_unstable();
    println!(
        "ping p50 {} ns p99 {} ns",
        samples[n / 2],
        samples[n * 99 / 100]
    );
    Ok(())
}
