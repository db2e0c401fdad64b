//! Survive a broker restart: hold locks, wait while the operator (or a test
//! script) kills and restarts `forelockd`, then release and carry on.
//! `FORELOCK_RUNTIME_DIR=/tmp/fl cargo run -p forelock --example restart -- 3`

use forelock::{Client, Error};
use std::time::Duration;

fn main() -> Result<(), Error> {
    let pause_s: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let client = Client::connect()?;
    let shared = client.lock_shared("restart:shared")?;
    let warm = client.lock("restart:warm")?;
    let other = Client::connect()?;
    // A waiter queued behind `warm` while the broker restarts.
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| {
            other
                .lock_timeout("restart:warm", Duration::from_secs(pause_s + 10))
                .map(|g| g.token())
        });
        println!(
            "holding: shared token {}, exclusive token {}; restart forelockd now",
            shared.token(),
            warm.token()
        );
        std::thread::sleep(Duration::from_secs(pause_s));
        let warm_token = warm.token();
        warm.release()?;
        let next = waiter.join().expect("waiter thread")?;
        println!("waiter got restart:warm with token {next} (> {warm_token})");
        assert!(next > warm_token);
        Ok::<(), Error>(())
    })?;
    shared.release()?;
    println!("ping after restart {:?}", client.ping()?);
    let again = client.lock("restart:warm")?;
    println!("relocked with token {} (ok)", again.token());
    Ok(())
}
