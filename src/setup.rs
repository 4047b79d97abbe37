//! `ots-server lab DIR`: everything a secured lab on one machine needs, in
//! one folder — the server's key, a key per worker and one for you,
//! allow-lists naming them, and a configuration for the server and for
//! the workers that point only there (so trying ots by hand never reads
//! or writes `/etc/ots`). Running it again keeps the keys it made.

use crate::security::{KeyPair, SecurityError};
use std::path::{Path, PathBuf};

/// What went wrong making the lab folder, with the path.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] SecurityError),
}

/// The files a lab folder holds.
pub struct Lab {
    pub dir: PathBuf,
    pub server_config: PathBuf,
    pub worker_config: PathBuf,
    /// `export` lines for ots-submit (`. DIR/env`).
    pub env: PathBuf,
}

fn write(path: &Path, text: &str) -> Result<(), SetupError> {
    std::fs::write(path, text).map_err(|source| SetupError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn private_dir(path: &Path) -> Result<(), SetupError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| SetupError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// The key pair at `base` (`.key`/`.pub`), made if absent.
fn key_at(base: &Path) -> Result<KeyPair, SetupError> {
    let private = base.with_extension("key");
    if private.exists() {
        return Ok(KeyPair::read(&private)?);
    }
    let pair = KeyPair::generate();
    pair.write(base)?;
    Ok(pair)
}

/// TOML's basic string for a path.
fn quoted(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// Makes (or refreshes) the lab in `dir` with `workers` and the admin
/// user `user`, the server on `control`/`events`.
pub fn lab(
    dir: &Path,
    workers: &[String],
    user: &str,
    control: &str,
    events: &str,
) -> Result<Lab, SetupError> {
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|source| SetupError::Write {
                path: dir.to_path_buf(),
                source,
            })?
            .join(dir)
    };
    private_dir(&dir)?;
    let (workers_dir, users_dir) = (dir.join("workers.d"), dir.join("users.d"));
    private_dir(&workers_dir)?;
    private_dir(&users_dir)?;
    key_at(&dir.join("server"))?;
    for name in workers {
        let pair = key_at(&dir.join(name))?;
        pair.public
            .write(&workers_dir.join(format!("{name}.pub")))?;
    }
    let me = key_at(&dir.join(user))?;
    me.public.write(&users_dir.join(format!("{user}.pub")))?;
    write(&users_dir.join(format!("{user}.role")), "admin\n")?;
    let server_config = dir.join("server.toml");
    write(
        &server_config,
        &format!(
            "# Made by `ots-server lab`: a secured server whose keys and state are all below {dir}.\n\
             control = {control:?}\nevents = {events:?}\nstate_dir = {}\nkey = {}\nworkers_dir = {}\nusers_dir = {}\n",
            quoted(&dir.join("server")),
            quoted(&dir.join("server.key")),
            quoted(&workers_dir),
            quoted(&users_dir),
            dir = dir.display(),
        ),
    )?;
    let worker_config = dir.join("worker.toml");
    write(
        &worker_config,
        &format!(
            "# Made by `ots-server lab`: workers {workers} of this lab; `{{name}}` is each worker's --name.\n\
             server = {control:?}\nevents = {events:?}\ndevice = \"devicegroup:example\"\nkey = {}\nserver_key = {}\n",
            quoted(&dir.join("{name}.key")),
            quoted(&dir.join("server.pub")),
            workers = workers.join(", "),
        ),
    )?;
    let env = dir.join("env");
    write(
        &env,
        &format!(
            "# `. {}`: ots-submit talks to this lab's server as {user} (admin).\n\
             export OTS_SERVER={control:?}\nexport OTS_KEY={}\nexport OTS_PINNED_SERVER_KEY={}\n",
            env.display(),
            quoted(&dir.join(format!("{user}.key"))),
            quoted(&dir.join("server.pub")),
        ),
    )?;
    Ok(Lab {
        dir,
        server_config,
        worker_config,
        env,
    })
}
