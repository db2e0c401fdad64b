//! Take a lock and hold it: `hold KEY SECONDS [shared]`. Prints the grant
//! (token, fast path, whether the previous owner died). Handy to check owner
//! death by hand: run it, `kill -9` it, run it again.

use forelock::{Client, Error};
use std::time::Duration;

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let key = args.next().unwrap_or_else(|| "hold".into());
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let shared = args.next().as_deref() == Some("shared");
    let client = Client::connect()?;
    let guard = if shared {
        client.lock_shared(&key)?
    } else {
        client.lock(&key)?
    };
    println!(
        "{key}: token {} fast_path {} shared {} previous_owner_died {}",
        guard.token(),
        guard.fast_path(),
        guard.is_shared(),
        guard.previous_owner_died()
    );
    std::thread::sleep(Duration::from_secs(seconds));
    guard.release()
}
