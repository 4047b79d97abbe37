//! The device's serial console, with pseudo-terminal pairs as the device
//! (no hardware): boot output before the task is in its record, lines
//! arrive live and in serial.log, binary noise is kept losslessly, an
//! unplug and replug is survived with the gap marked, and a console
//! pattern that never appears fails the task with a clear reason.

mod common;

use common::*;
use serialport::SerialPort;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const FAST: [(&str, &str); 1] = [("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250")];

/// A pseudo-terminal pair: the test writes on the master like a device;
/// the worker opens the slave through a symlink (as /dev/serial/by-id/…),
/// which a replug points at a new pair.
struct Device {
    master: serialport::TTYPort,
    _slave: serialport::TTYPort,
}

fn plug(link: &Path) -> Device {
    let (master, slave) = serialport::TTYPort::pair().expect("a pseudo-terminal pair");
    let path = slave.name().expect("the slave's path");
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(&path, link).unwrap();
    Device {
        master,
        _slave: slave,
    }
}

/// The console stream as the record reconstructs it: `|` records with
/// their newline, `+` pieces as they are; notes and sent bytes left out.
fn reconstruct(record: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = record;
    while !rest.is_empty() {
        let end = rest
            .iter()
            .position(|b| *b == b'\n')
            .expect("records end with a newline");
        let rec = &rest[..end];
        rest = &rest[end + 1..];
        assert!(
            rec.len() >= 27 && rec[24] == b' ' && rec[26] == b' ',
            "{:?}",
            String::from_utf8_lossy(rec)
        );
        let body = &rec[27..];
        match rec[25] {
            b'|' => {
                out.extend_from_slice(body);
                out.push(b'\n');
            }
            b'+' => out.extend_from_slice(body),
            b'!' | b'>' => {}
            other => panic!("unknown flag {other}"),
        }
    }
    out
}

fn gated(dir: &Path) -> (PathBuf, PathBuf) {
    let go = dir.join("go");
    let conductor = script(
        dir,
        "gated.sh",
        &format!(
            "while [ ! -e {go:?} ]; do sleep 0.05; done\necho '<testsuite><testcase name=\"c\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\""
        ),
    );
    (conductor, go)
}

fn fetch_serial_log(server: &ServerProc, run: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("fetched-{run}"));
    let o = submit(server, &["fetch", run, out.to_str().unwrap()], LIMIT);
    assert!(o.status.success(), "{}", text(&o.stderr));
    std::fs::read(out.join(format!("{run}.1")).join("serial.log")).expect("serial.log fetched")
}

fn submit_on(server: &ServerProc, extra: &[&str]) -> String {
    let mut args = vec![
        "--device",
        "devicegroup:c",
        "--image",
        "i",
        "--packages",
        "p",
        "--queue-anyway",
    ];
    args.extend_from_slice(extra);
    submit_run(server, &args)
}

#[test]
fn boot_output_live_lines_and_noise_are_all_in_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &FAST);
    let link = dir.path().join("console");
    let mut dev = plug(&link);
    let (conductor, go) = gated(dir.path());
    let w = start_worker(
        dir.path(),
        "w",
        "devicegroup:c",
        &server,
        &[conductor.to_str().unwrap()],
        &[("OTS_WORKER_SERIAL__PORT", link.to_str().unwrap())],
    );
    assert!(
        w.stderr.wait_for("console open", LIMIT).is_some(),
        "{:?}",
        w.stderr.all()
    );
    // Boot output before any task.
    let mut sent = b"U-Boot 2026.01\nBOOT line 2\n".to_vec();
    dev.master.write_all(&sent).unwrap();
    let run = submit_on(&server, &[]);
    wait_status(&server, &run, LIMIT, running);
    let live = b"LIVE line while the task runs\n";
    dev.master.write_all(live).unwrap();
    sent.extend_from_slice(live);
    // Binary noise, invalid UTF-8, a long line without newline.
    let noise: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    dev.master.write_all(&noise).unwrap();
    sent.extend_from_slice(&noise);
    let tail = b"\nlogin: ";
    dev.master.write_all(tail).unwrap();
    sent.extend_from_slice(tail);
    // The prompt (no newline) is recorded once the console is quiet.
    let logs = || text(&submit(&server, &["logs", &run], LIMIT).stdout);
    let deadline = std::time::Instant::now() + LIMIT;
    while !logs().contains("[serial] login: ") {
        assert!(std::time::Instant::now() < deadline, "{}", logs());
        std::thread::sleep(Duration::from_millis(50)); // polling the stored log
    }
    std::fs::write(&go, "").unwrap();
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let shown = logs();
    assert!(
        shown.contains("[serial] LIVE line while the task runs"),
        "{shown}"
    );
    assert!(shown.contains("\\x"), "noise is escaped in the live view");
    let record = fetch_serial_log(&server, &run, dir.path());
    let stream = reconstruct(&record);
    assert!(
        stream.ends_with(&sent),
        "serial.log does not hold every byte sent ({} bytes reconstructed, {} sent)",
        stream.len(),
        sent.len()
    );
    assert!(
        String::from_utf8_lossy(&record[..30]).contains('T'),
        "timestamped"
    );
}

#[test]
fn an_unplugged_console_is_reopened_and_the_gap_marked() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &FAST);
    let link = dir.path().join("console");
    let missing = dir.path().join("nothing-here");
    std::os::unix::fs::symlink(&missing, &link).unwrap();
    let (conductor, go) = gated(dir.path());
    let w = start_worker(
        dir.path(),
        "w",
        "devicegroup:c",
        &server,
        &[conductor.to_str().unwrap()],
        &[("OTS_WORKER_SERIAL__PORT", link.to_str().unwrap())],
    );
    // Missing at start: a warning, and the worker still serves.
    assert!(w
        .stderr
        .wait_for("console unavailable at start", LIMIT)
        .is_some());
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w"])));
    // `workers` says so.
    let console_is = |want: &'static str| {
        move |ws: &[serde_json::Value]| {
            ws.iter().any(|w| {
                w["name"] == "w" && w["console"].as_str().is_some_and(|c| c.starts_with(want))
            })
        }
    };
    assert!(wait_for_workers(&server, LIMIT, console_is("unavailable")));
    let mut dev = plug(&link);
    let mark = w.stderr.len();
    assert!(
        w.stderr
            .wait_for_after(mark, "console back", LIMIT)
            .is_some(),
        "{:?}",
        w.stderr.all()
    );
    assert!(wait_for_workers(&server, LIMIT, console_is("ok")));
    let run = submit_on(&server, &[]);
    wait_status(&server, &run, LIMIT, running);
    dev.master.write_all(b"before the unplug\n").unwrap();
    // Unplugged only once the worker has it (a hangup discards what the
    // tty has not handed over yet, like a real unplug).
    let logs = || text(&submit(&server, &["logs", &run], LIMIT).stdout);
    let deadline = std::time::Instant::now() + LIMIT;
    while !logs().contains("before the unplug") {
        assert!(std::time::Instant::now() < deadline, "{}", logs());
        std::thread::sleep(Duration::from_millis(50)); // polling the stored log
    }
    let mark = w.stderr.len();
    drop(dev);
    assert!(
        w.stderr
            .wait_for_after(mark, "console lost", LIMIT)
            .is_some(),
        "{:?}",
        w.stderr.all()
    );
    let mut dev = plug(&link);
    assert!(
        w.stderr
            .wait_for_after(mark, "console back", LIMIT)
            .is_some(),
        "{:?}",
        w.stderr.all()
    );
    dev.master.write_all(b"after the replug\n").unwrap();
    let deadline = std::time::Instant::now() + LIMIT;
    while !logs().contains("after the replug") {
        assert!(std::time::Instant::now() < deadline, "{}", logs());
        std::thread::sleep(Duration::from_millis(50)); // polling the stored log
    }
    std::fs::write(&go, "").unwrap();
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let record = String::from_utf8_lossy(&fetch_serial_log(&server, &run, dir.path())).into_owned();
    let lost = record.find("lost").expect("the gap is marked");
    let back = record.rfind("back after").expect("the return is marked");
    assert!(
        record.find("before the unplug").unwrap() < lost && lost < back,
        "{record}"
    );
    assert!(back < record.find("after the replug").unwrap(), "{record}");
}

#[test]
fn console_actions_send_at_start_and_a_pattern_never_seen_fails_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &FAST);
    let link = dir.path().join("console");
    let mut dev = plug(&link);
    let (conductor, go) = gated(dir.path());
    std::fs::write(&go, "").unwrap();
    let w = start_worker(
        dir.path(),
        "w",
        "devicegroup:c",
        &server,
        &[conductor.to_str().unwrap()],
        &[("OTS_WORKER_SERIAL__PORT", link.to_str().unwrap())],
    );
    assert!(w.stderr.wait_for("console open", LIMIT).is_some());
    let run = submit_on(
        &server,
        &[
            "--option",
            "console.send=root\\r",
            "--option",
            "console.expect=login:",
            "--option",
            "console.expect_timeout=1s",
        ],
    );
    // The worker sends "root\r" to the device at the task's start.
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    dev.master.set_timeout(Duration::from_secs(10)).unwrap();
    while !got.ends_with(b"root\r") {
        let n = std::io::Read::read(&mut dev.master, &mut buf)
            .expect("the worker wrote to the console");
        got.extend_from_slice(&buf[..n]);
    }
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "ERROR", "{st:#}");
    let reason = st["tasks"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("console: expected \"login:\""), "{reason}");
    // The same with the prompt there: the task runs.
    let run = submit_on(
        &server,
        &[
            "--option",
            "console.expect=login:",
            "--option",
            "console.expect_timeout=20s",
        ],
    );
    wait_status(&server, &run, LIMIT, |st| {
        st["tasks"][0]["state"] == "running"
    });
    dev.master.write_all(b"\nmy-board login: ").unwrap();
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
}

#[test]
fn the_conductor_talks_to_the_device_through_the_re_exported_console() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &FAST);
    let link = dir.path().join("console");
    let mut dev = plug(&link);
    let conductor = script(
        dir.path(),
        "talk.sh",
        "exec 3<>\"$1\"\nprintf 'hello device\\r\\n' >&3\nIFS= read -r -t 20 line <&3\necho \"conductor got: $line\"\necho '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
    );
    let w = start_worker(
        dir.path(),
        "w",
        "devicegroup:c",
        &server,
        &[conductor.to_str().unwrap(), "{console}"],
        &[("OTS_WORKER_SERIAL__PORT", link.to_str().unwrap())],
    );
    assert!(w.stderr.wait_for("console open", LIMIT).is_some());
    let run = submit_on(&server, &[]);
    // The device hears the conductor…
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    dev.master.set_timeout(Duration::from_secs(20)).unwrap();
    while !got.ends_with(b"hello device\r\n") {
        let n = std::io::Read::read(&mut dev.master, &mut buf).expect("the conductor wrote");
        got.extend_from_slice(&buf[..n]);
    }
    // …and the conductor hears the device.
    dev.master.write_all(b"device answers\n").unwrap();
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let logs = text(&submit(&server, &["logs", &run], LIMIT).stdout);
    assert!(logs.contains("conductor got: device answers"), "{logs}");
    let record = String::from_utf8_lossy(&fetch_serial_log(&server, &run, dir.path())).into_owned();
    assert!(record.contains(" > hello device\r\n"), "{record}");
    assert!(record.contains(" | device answers\n"), "{record}");
}

#[test]
fn console_actions_can_come_from_the_worker_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &FAST);
    let link = dir.path().join("console");
    let _dev = plug(&link);
    let (conductor, go) = gated(dir.path());
    std::fs::write(&go, "").unwrap();
    let w = start_worker(
        dir.path(),
        "w",
        "devicegroup:c",
        &server,
        &[conductor.to_str().unwrap()],
        &[
            ("OTS_WORKER_SERIAL__PORT", link.to_str().unwrap()),
            ("OTS_WORKER_SERIAL__EXPECT", "ready>"),
            ("OTS_WORKER_SERIAL__EXPECT_TIMEOUT_MS", "1s"),
        ],
    );
    assert!(w.stderr.wait_for("console open", LIMIT).is_some());
    let run = submit_on(&server, &[]);
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "ERROR", "{st:#}");
    let reason = st["tasks"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("console: expected \"ready>\" within 1s"),
        "{reason}"
    );
}
