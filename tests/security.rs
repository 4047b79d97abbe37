//! Issue 8 (in progress): keys as the operator makes them.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

#[test]
fn keygen_writes_a_private_key_only_its_owner_can_read_and_never_overwrites_one() {
    let dir = tempfile::tempdir().unwrap();
    for (program, args) in [
        ("ots-server", vec!["keygen"]),
        ("ots-worker", vec!["keygen"]),
        ("ots-submit", vec!["keygen"]),
    ] {
        let base = dir.path().join(program);
        let mut cmd = Command::new(bin(program));
        cmd.args(&args).arg(&base);
        let out = run_bounded(cmd, Duration::from_secs(10));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{program}: {}",
            text(&out.stderr)
        );
        let key = base.with_extension("key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{program}");
        let public = ots::security::PublicKey::read(&base.with_extension("pub")).unwrap();
        assert!(text(&out.stdout).contains(&public.to_string()));
        let pair = ots::security::KeyPair::read(&key).unwrap();
        assert_eq!(pair.public, public);
        // A second keygen on the same path refuses to overwrite.
        let mut again = Command::new(bin(program));
        again.args(&args).arg(&base);
        let out = run_bounded(again, Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(73), "{program}");
        assert!(
            text(&out.stderr).contains("keygen"),
            "{}",
            text(&out.stderr)
        );
    }
}
