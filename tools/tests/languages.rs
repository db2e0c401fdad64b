//! forelock from every language: the C ABI's contract (a C program compiled
//! with gcc against the cdylib and the staticlib), `forelock lock/unlock`
//! (shell-lifetime locks), and four languages (C, Python, async Rust, a
//! shell script) contending for one key on one broker.
//!
//! The C library and the Python extension are the ones `cargo build
//! --workspace` puts beside the `forelock` binary (CI builds them before the
//! tests); the Python package is assembled from the extension and
//! client/python/python/forelock/ in a temporary directory, so no pip
//! install is needed. Without gcc or python3 the part that needs them is
//! skipped, saying so, unless FORELOCK_REQUIRE_ALL_LANGUAGES is set (CI).

mod support;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const CONFIG: &str = "[table]\nslots = 64\nclients = 32\n";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// target/<profile>: where cargo put `forelock`, the C library and the
/// Python extension.
fn artifacts() -> PathBuf {
    Path::new(cli_exe()).parent().unwrap().into()
}

fn artifact(name: &str) -> PathBuf {
    let path = artifacts().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace's libraries first: cargo build --workspace",
        path.display()
    );
    path
}

/// Whether `program` runs; if not, skip (or fail under CI).
fn have(program: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("FORELOCK_REQUIRE_ALL_LANGUAGES").is_none(),
            "{program} is missing and FORELOCK_REQUIRE_ALL_LANGUAGES is set"
        );
        eprintln!("skipping the {program} part: {program} is not installed");
    }
    found
}

fn run_ok(command: &mut Command, what: &str) -> String {
    let out = wait_output(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}")),
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Compile a C file against the C ABI: dynamically (rpath to the cdylib) or
/// statically (the staticlib). Flags come from forelock.pc (pkg-config),
/// filled in for the build tree.
fn compile_c(source: &Path, out: &Path, dir: &Path, static_link: bool) {
    let pc_dir = dir.join("pkgconfig");
    std::fs::create_dir_all(&pc_dir).unwrap();
    let pc = std::fs::read_to_string(repo().join("client/capi/forelock.pc.in"))
        .unwrap()
        .replace("@PREFIX@", &repo().display().to_string())
        .replace("@LIBDIR@", &artifacts().display().to_string())
        .replace(
            "@INCLUDEDIR@",
            &repo().join("client/capi/include").display().to_string(),
        )
        .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
    std::fs::write(pc_dir.join("forelock.pc"), pc).unwrap();
    let flags = |args: &[&str]| -> Vec<String> {
        let mut pkg = Command::new("pkg-config");
        pkg.args(args)
            .arg("forelock")
            .env("PKG_CONFIG_PATH", &pc_dir);
        run_ok(&mut pkg, "pkg-config forelock")
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    let mut gcc = Command::new("gcc");
    gcc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread"])
        .args(flags(&["--cflags"]))
        .arg(source)
        .arg("-o")
        .arg(out);
    if static_link {
        gcc.arg(artifact("libforelock_capi.a"))
            .args(["-lpthread", "-ldl", "-lm"]);
    } else {
        artifact("libforelock_capi.so");
        gcc.args(flags(&["--libs"]))
            .arg(format!("-Wl,-rpath,{}", artifacts().display()));
    }
    run_ok(&mut gcc, &format!("gcc {}", source.display()));
}

#[test]
fn the_c_abi_keeps_its_contract_linked_dynamically_and_statically() {
    if !have("gcc") || !have("pkg-config") {
        return;
    }
    let dir = TempDir::new("capi");
    let _broker = Broker::start(dir.path(), CONFIG);
    let source = repo().join("client/capi/tests/contract.c");
    for static_link in [false, true] {
        let exe = dir.path().join(if static_link {
            "contract-static"
        } else {
            "contract"
        });
        compile_c(&source, &exe, dir.path(), static_link);
        let said = run_ok(Command::new(&exe).arg(dir.path()), "the C contract test");
        assert!(said.contains("C CONTRACT OK"), "{said}");
    }
}

fn lock_cmd(dir: &Path, args: &[&str]) -> std::process::Output {
    forelock(dir, &[&["lock"], args].concat())
}

#[test]
fn a_shell_lifetime_lock_lasts_until_its_process_exits_or_is_unlocked() {
    let dir = TempDir::new("shell-lock");
    let _broker = Broker::start(dir.path(), CONFIG);
    // The process the lock is held for: a sleeper we end ourselves.
    let mut owner = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = owner.id().to_string();
    let out = lock_cmd(dir.path(), &["--pid", &pid, "shell:key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first: u64 = stdout(&out).trim().parse().expect("a token on stdout");

    // Held: another try fails with the conflict code, a wait times out.
    let other = std::process::id().to_string();
    let out = lock_cmd(
        dir.path(),
        &["-n", "-E", "75", "--pid", &other, "shell:key"],
    );
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    let out = lock_cmd(dir.path(), &["-w", "0.1", "--pid", &other, "shell:key"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // The same pid and key twice is a conflict too.
    let out = lock_cmd(dir.path(), &["-n", "--pid", &pid, "shell:key"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("already holds"), "{}", stderr(&out));

    // The owner exits: released (cleanly: no owner-died for the next one).
    owner.kill().unwrap();
    owner.wait().unwrap();
    let out = lock_cmd(dir.path(), &["-w", "10", "--pid", &other, "shell:key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second: u64 = stdout(&out).trim().parse().unwrap();
    assert!(second > first, "tokens {first} then {second}");
    assert!(!stderr(&out).contains("died"), "{}", stderr(&out));

    // unlock releases it now; a second unlock finds nothing.
    let out = forelock(dir.path(), &["unlock", "--pid", &other, "shell:key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = forelock(dir.path(), &["unlock", "--pid", &other, "shell:key"]);
    assert_eq!(out.status.code(), Some(1));
    let out = lock_cmd(dir.path(), &["-n", "-s", "--pid", &other, "shell:key"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = forelock(dir.path(), &["unlock", "--pid", &other, "shell:key"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Bad input.
    let out = lock_cmd(dir.path(), &["--pid", "0", "shell:key"]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    let out = lock_cmd(dir.path(), &["--pid", &other, ""]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
}

#[test]
fn the_shell_idiom_holds_the_lock_for_the_script_and_no_longer() {
    let dir = TempDir::new("shell-idiom");
    let _broker = Broker::start(dir.path(), CONFIG);
    // The README's idiom: the script exits without unlocking.
    let script = format!(
        "token=$('{cli}' lock -n --pid $$ shell:idiom) || exit 3\n\
         echo \"$token\"\n\
         '{cli}' lock -n --pid 1 shell:idiom && exit 4\n\
         exit 0\n",
        cli = cli_exe()
    );
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(&script)
        .env("FORELOCK_RUNTIME_DIR", dir.path());
    let first: u64 = run_ok(&mut sh, "the idiom script").trim().parse().unwrap();
    // The script is gone: its lock is free again (bounded wait: the holder
    // sees the exit through its pidfd).
    let me = std::process::id().to_string();
    let out = lock_cmd(dir.path(), &["-w", "10", "--pid", &me, "shell:idiom"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).trim().parse::<u64>().unwrap() > first);
    forelock(dir.path(), &["unlock", "--pid", &me, "shell:idiom"]);
}

const C_ITERS: u32 = 150;
const PY_ITERS: u32 = 150;
const RUST_ITERS: u32 = 150;
const SHELL_ITERS: u32 = 15;

/// The Python package assembled in `dir`: forelock/__init__.py and the
/// extension built by cargo, as `_forelock.so`.
fn python_package(dir: &Path) -> PathBuf {
    let root = dir.join("python");
    let package = root.join("forelock");
    std::fs::create_dir_all(&package).unwrap();
    let source = repo().join("client/python/python/forelock");
    for entry in std::fs::read_dir(source).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), package.join(entry.file_name())).unwrap();
    }
    std::fs::copy(artifact("lib_forelock.so"), package.join("_forelock.so")).unwrap();
    root
}

#[test]
fn c_python_async_rust_and_a_shell_script_share_one_key() {
    let with_c = have("gcc") && have("pkg-config");
    let with_python = have("python3");
    let dir = TempDir::new("languages");
    let _broker = Broker::start(dir.path(), CONFIG);
    let key = "lang:counter";
    let counter = dir.path().join("counter");
    let log = dir.path().join("tokens.log");
    std::fs::write(&counter, "0").unwrap();
    let mut children = Vec::new();
    let mut expected = 0;

    if with_c {
        let exe = dir.path().join("counter-c");
        compile_c(
            &repo().join("client/capi/examples/counter.c"),
            &exe,
            dir.path(),
            false,
        );
        let mut c = Command::new(&exe);
        c.arg(dir.path())
            .arg(key)
            .arg(C_ITERS.to_string())
            .arg(&counter)
            .arg(&log);
        children.push(("C", c));
        expected += C_ITERS;
    }
    if with_python {
        let program = format!(
            "import forelock, sys\n\
             counter, log = sys.argv[1], sys.argv[2]\n\
             for _ in range({PY_ITERS}):\n\
             \x20   with forelock.lock({key:?}) as g:\n\
             \x20       n = int(open(counter).read() or 0) + 1\n\
             \x20       open(counter, 'w').write(str(n))\n\
             \x20       with open(log, 'a') as f:\n\
             \x20           f.write(f'{{n}} {{g.token}}\\n')\n\
             print('DONE')\n"
        );
        let mut py = Command::new("python3");
        py.arg("-c")
            .arg(program)
            .arg(&counter)
            .arg(&log)
            .env("PYTHONPATH", python_package(dir.path()))
            .env("FORELOCK_RUNTIME_DIR", dir.path());
        children.push(("Python", py));
        expected += PY_ITERS;
    }
    let shell = format!(
        "i=0\n\
         while [ $i -lt {SHELL_ITERS} ]; do\n\
         \x20 token=$('{cli}' lock --pid $$ {key}) || exit 1\n\
         \x20 n=$(( $(cat '{counter}') + 1 ))\n\
         \x20 echo $n > '{counter}'\n\
         \x20 echo \"$n $token\" >> '{log}'\n\
         \x20 '{cli}' unlock --pid $$ {key} || exit 2\n\
         \x20 i=$((i + 1))\n\
         done\n\
         echo DONE\n",
        cli = cli_exe(),
        counter = counter.display(),
        log = log.display(),
    );
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(shell)
        .env("FORELOCK_RUNTIME_DIR", dir.path());
    children.push(("shell", sh));
    expected += SHELL_ITERS;

    let running: Vec<_> = children
        .into_iter()
        .map(|(name, mut command)| {
            let child = command
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start the {name} contender: {e}"));
            (name, child)
        })
        .collect();

    // The async Rust contender: this thread, a current-thread runtime.
    let client = forelock::Client::connect_to(dir.path()).unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(async {
            for _ in 0..RUST_ITERS {
                let guard = client.lock_async(key).await.unwrap();
                let n: u64 = std::fs::read_to_string(&counter)
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap_or(0)
                    + 1;
                std::fs::write(&counter, n.to_string()).unwrap();
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(&log)
                    .unwrap();
                writeln!(f, "{n} {}", guard.token()).unwrap();
                drop(guard);
                // Let the others in between (the fast path would otherwise
                // keep it for this process most of the time).
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        });
    expected += RUST_ITERS;

    for (name, child) in running {
        let out = wait_output(child);
        assert!(
            out.status.success() && stdout(&out).contains("DONE"),
            "the {name} contender failed ({}):\n{}\n{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
    }
    let total: u32 = std::fs::read_to_string(&counter)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        total, expected,
        "lost or doubled updates: two holders at once"
    );
    let mut rows: Vec<(u64, u64)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| {
            let (n, token) = line.split_once(' ').unwrap();
            (n.parse().unwrap(), token.parse().unwrap())
        })
        .collect();
    assert_eq!(rows.len(), expected as usize);
    rows.sort();
    for pair in rows.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "a counter value twice or skipped");
        assert!(
            pair[1].1 > pair[0].1,
            "the fencing token went backwards across languages: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
}
