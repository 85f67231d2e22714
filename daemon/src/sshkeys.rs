//! SSH key injection (`portcullis ssh add-key`): validate public keys and
//! merge them into a user's `authorized_keys`, atomically and idempotently,
//! never dropping keys that are already there. Run by root from the CLI, so
//! the daemon itself needs no rights over home directories.

use std::{
    fs::{self, File},
    io::Write as _,
    os::unix::fs::{PermissionsExt as _, chown},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;

/// Key types accepted (DSA is refused: OpenSSH disabled it years ago).
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// A public key: its type and base64 blob identify it; the comment does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub kind: String,
    pub blob: String,
    pub comment: Option<String>,
}

impl PublicKey {
    /// Parses one `authorized_keys`-style line without options
    /// (`TYPE BASE64 [COMMENT]`), checking that the blob is well-formed
    /// base64 and encodes a key of the stated type.
    pub fn parse(line: &str) -> anyhow::Result<PublicKey> {
        let mut parts = line.split_whitespace();
        let kind = parts.next().context("empty key")?;
        if !KEY_TYPES.contains(&kind) {
            bail!(
                "{kind:?} is not a supported key type (expected one of {})",
                KEY_TYPES.join(", ")
            );
        }
        let blob = parts
            .next()
            .with_context(|| format!("{kind} key without its base64 part"))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(blob)
            .with_context(|| format!("the {kind} key is not valid base64"))?;
        // The blob starts with the key type as an SSH string: u32 length, bytes.
        let inner = bytes
            .get(..4)
            .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .and_then(|n| bytes.get(4..4 + n));
        if inner != Some(kind.as_bytes()) {
            bail!("the key's data does not encode a {kind} key (truncated or mislabelled?)");
        }
        let comment: Vec<&str> = parts.collect();
        Ok(PublicKey {
            kind: kind.to_string(),
            blob: blob.to_string(),
            comment: (!comment.is_empty()).then(|| comment.join(" ")),
        })
    }

    fn line(&self) -> String {
        match &self.comment {
            Some(c) => format!("{} {} {c}", self.kind, self.blob),
            None => format!("{} {}", self.kind, self.blob),
        }
    }

    /// Whether `line` (an existing `authorized_keys` line, perhaps with
    /// options in front) holds this key.
    fn is_in(&self, line: &str) -> bool {
        let words: Vec<&str> = line.split_whitespace().collect();
        words
            .windows(2)
            .any(|w| w[0] == self.kind && w[1] == self.blob)
    }
}

/// `existing` with the keys not already in it appended; existing lines are
/// kept as they are. Returns the new text and how many keys were added.
pub fn merge(existing: &str, keys: &[PublicKey]) -> (String, usize) {
    let mut out = existing.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let mut added = 0;
    for key in keys {
        if out.lines().any(|l| key.is_in(l)) {
            continue;
        }
        out.push_str(&key.line());
        out.push('\n');
        added += 1;
    }
    (out, added)
}

/// Adds `keys` to `user`'s `~/.ssh/authorized_keys`: creates `~/.ssh`
/// (0700) and the file (0600) owned by the user, fixes their modes and
/// ownership if they are off, writes atomically, skips keys already there.
pub fn add_keys(user: &str, keys: &[PublicKey]) -> anyhow::Result<usize> {
    let u =
        nix::unistd::User::from_name(user)?.with_context(|| format!("no user named {user:?}"))?;
    let (uid, gid) = (u.uid.as_raw(), u.gid.as_raw());
    let ssh = u.dir.join(".ssh");
    add_keys_at(&ssh, uid, gid, keys)
}

/// [`add_keys`] for an explicit `.ssh` directory and owner.
pub fn add_keys_at(ssh: &Path, uid: u32, gid: u32, keys: &[PublicKey]) -> anyhow::Result<usize> {
    match fs::symlink_metadata(ssh) {
        Ok(m) if m.file_type().is_symlink() => bail!(
            "{} is a symbolic link; refusing to write through it",
            ssh.display()
        ),
        Ok(m) if !m.is_dir() => bail!("{} exists and is not a directory", ssh.display()),
        Ok(_) => {}
        Err(_) => {
            fs::create_dir_all(ssh).with_context(|| format!("cannot create {}", ssh.display()))?
        }
    }
    fs::set_permissions(ssh, fs::Permissions::from_mode(0o700))?;
    chown(ssh, Some(uid), Some(gid))?;
    let path: PathBuf = ssh.join("authorized_keys");
    if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(
            "{} is a symbolic link; refusing to write through it",
            path.display()
        );
    }
    let existing = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let (text, added) = merge(&existing, keys);
    let tmp = ssh.join(".authorized_keys.portcullis.tmp");
    {
        let mut f = File::create(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    chown(&tmp, Some(uid), Some(gid))?;
    fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
    File::open(ssh)?.sync_all()?;
    Ok(added)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    /// A well-formed ed25519 public key blob (type string + 32 key bytes).
    fn key(seed: u8, comment: &str) -> String {
        let mut blob = Vec::new();
        blob.extend_from_slice(&11u32.to_be_bytes());
        blob.extend_from_slice(b"ssh-ed25519");
        blob.extend_from_slice(&32u32.to_be_bytes());
        blob.extend_from_slice(&[seed; 32]);
        format!(
            "ssh-ed25519 {} {comment}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    #[test]
    fn validates_keys() {
        let k = PublicKey::parse(&key(1, "alice@laptop")).unwrap();
        assert_eq!(
            (k.kind.as_str(), k.comment.as_deref()),
            ("ssh-ed25519", Some("alice@laptop"))
        );
        for (bad, says) in [
            ("", "empty"),
            ("ssh-dss AAAAB3NzaC1kc3M=", "not a supported key type"),
            ("ssh-ed25519", "without its base64"),
            ("ssh-ed25519 !!!notbase64", "not valid base64"),
            (
                "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAA",
                "does not encode a ssh-rsa key",
            ),
            ("ssh-ed25519 AAAA", "does not encode"),
        ] {
            let e = PublicKey::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn merge_keeps_existing_lines_and_skips_duplicates() {
        let existing = format!(
            "# managed elsewhere\nfrom=\"10.0.0.0/8\" {}\n{}",
            key(1, "old"),
            key(2, "other")
        );
        let keys = [
            PublicKey::parse(&key(1, "same key, new comment")).unwrap(),
            PublicKey::parse(&key(3, "new")).unwrap(),
            PublicKey::parse(&key(3, "new twice")).unwrap(),
        ];
        let (text, added) = merge(&existing, &keys);
        assert_eq!(added, 1);
        assert!(
            text.starts_with(&format!("{existing}\n")),
            "existing lines changed:\n{text}"
        );
        assert_eq!(text.lines().count(), 4);
        assert!(text.ends_with(&format!("{}\n", key(3, "new"))));
        // Idempotent.
        assert_eq!(merge(&text, &keys), (text.clone(), 0));
    }

    #[test]
    fn writes_with_safe_modes_fixing_loose_ones() {
        let home = tempfile::tempdir().unwrap();
        let ssh = home.path().join(".ssh");
        fs::create_dir(&ssh).unwrap();
        fs::set_permissions(&ssh, fs::Permissions::from_mode(0o777)).unwrap();
        fs::write(ssh.join("authorized_keys"), key(1, "kept")).unwrap();
        fs::set_permissions(
            ssh.join("authorized_keys"),
            fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let (uid, gid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let added =
            add_keys_at(&ssh, uid, gid, &[PublicKey::parse(&key(2, "new")).unwrap()]).unwrap();
        assert_eq!(added, 1);
        let text = fs::read_to_string(ssh.join("authorized_keys")).unwrap();
        assert!(text.contains("kept") && text.contains("new"));
        assert_eq!(fs::metadata(&ssh).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            fs::metadata(ssh.join("authorized_keys")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(
            add_keys_at(
                &ssh,
                uid,
                gid,
                &[PublicKey::parse(&key(2, "again")).unwrap()]
            )
            .unwrap(),
            0
        );
        // A symlinked .ssh is refused.
        let other = home.path().join("elsewhere");
        fs::create_dir(&other).unwrap();
        let link = home.path().join("linked");
        std::os::unix::fs::symlink(&other, &link).unwrap();
        assert!(
            add_keys_at(&link, uid, gid, &[])
                .unwrap_err()
                .to_string()
                .contains("symbolic link")
        );
    }
}
