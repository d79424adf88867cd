//! Whose user and group ids a mount shows, and who counts as root.
//!
//! A layer records the image's ids. Root on the host, or inside a user namespace (the kernel
//! maps the ids through the namespace's uid/gid maps, as rootless containers need), sees them
//! as they are. An unprivileged user outside a user namespace can choose to see every file as
//! their own instead: the caller then stands for the image's root, so that what they create or
//! chown to themselves is committed as `0:0`, as in a rootless container.

use std::io;

/// Who asks, in the ids of the request or of the layers (the new entry's owner).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// The ids a mount shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Owners {
    /// The image's ids, unchanged.
    #[default]
    Image,
    /// Every file shown as owned by `uid:gid`, who acts as the image's root.
    Squash { uid: u32, gid: u32 },
}

impl Owners {
    /// Squashed to the calling process's ids.
    pub fn caller() -> Owners {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Owners::Squash { uid, gid }
    }

    /// The ids to show for a file owned by `uid:gid` in the layers.
    pub fn show(&self, uid: u32, gid: u32) -> (u32, u32) {
        match *self {
            Owners::Image => (uid, gid),
            Owners::Squash { uid, gid } => (uid, gid),
        }
    }

    /// A requester's identity in the layers' terms.
    pub fn caller_in(&self, c: Caller) -> Caller {
        Caller {
            uid: self.uid_in(c.uid),
            gid: self.gid_in(c.gid),
        }
    }

    /// A uid a request names (chown, the creator) in the layers' terms.
    pub fn uid_in(&self, id: u32) -> u32 {
        match *self {
            Owners::Squash { uid, .. } if id == uid => 0,
            _ => id,
        }
    }

    pub fn gid_in(&self, id: u32) -> u32 {
        match *self {
            Owners::Squash { gid, .. } if id == gid => 0,
            _ => id,
        }
    }
}

/// True inside a user namespace other than the initial one: ids are mapped, and being uid 0
/// there does not make the process root on the host.
pub fn in_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => !is_identity_map(&map),
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

fn is_identity_map(map: &str) -> bool {
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| !f.is_empty())
        .collect();
    matches!(lines.as_slice(), [f] if f.as_slice() == ["0", "0", "4294967295"])
}

/// Root of the initial user namespace: may chown to any id, make device nodes, grant suid.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 && !in_user_namespace() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_map_is_the_initial_namespace() {
        assert!(is_identity_map("         0          0 4294967295\n"));
        assert!(!is_identity_map("         0       1001          1\n"));
        assert!(!is_identity_map("0 0 1000\n1000 100000 65536\n"));
    }

    #[test]
    fn squash_maps_the_caller_to_root_and_shows_everything_as_the_caller() {
        let o = Owners::Squash {
            uid: 1001,
            gid: 1002,
        };
        assert_eq!(o.show(0, 0), (1001, 1002));
        assert_eq!(o.show(33, 44), (1001, 1002));
        assert_eq!(o.uid_in(1001), 0);
        assert_eq!(o.gid_in(1002), 0);
        assert_eq!(o.uid_in(5), 5);
        assert_eq!(Owners::Image.show(33, 44), (33, 44));
        assert_eq!(Owners::Image.uid_in(1001), 1001);
    }
}
