//! Pins on the bpf filesystem: directories, links pinned and opened,
//! a pin removed with its link detached at once; bpffs mounted if needed.

use std::{fs, io, path::Path};

use aya::programs::links::{FdLink, PinnedLink};

use crate::error::LoaderError;

pub(super) fn create_pin_dir(dir: &Path) -> Result<(), LoaderError> {
    fs::create_dir_all(dir).map_err(|e| LoaderError::Pin {
        path: dir.to_owned(),
        reason: e.to_string(),
    })
}

pub(super) fn pin(link: FdLink, path: &Path) -> Result<(), LoaderError> {
    link.pin(path).map(drop).map_err(|e| LoaderError::Pin {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

pub(super) fn open_pinned(path: &Path) -> Result<Option<FdLink>, LoaderError> {
    if !path.exists() {
        return Ok(None);
    }
    let pinned = PinnedLink::from_pin(path).map_err(|e| LoaderError::Pin {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Some(FdLink::from(pinned)))
}

/// Detaches the link pinned at `path` at once and removes the pin.
pub(super) fn remove_pin(path: &Path) -> Result<(), LoaderError> {
    match crate::bpfsys::detach_and_unpin(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LoaderError::Pin {
            path: path.to_owned(),
            reason: format!("detach: {e}"),
        }),
    }
}

/// Makes sure `dir` lies on a bpffs, mounting one at /sys/fs/bpf when
/// nothing is mounted there yet, and creates `dir`.
pub fn ensure_bpffs(dir: &Path) -> Result<(), LoaderError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let bpffs_err = |source| LoaderError::Bpffs {
        path: dir.to_owned(),
        error: source,
    };
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_fs(root, BPF_FS_MAGIC) {
        let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: mount(2) with NUL-terminated strings and no data.
        if unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(bpffs_err(io::Error::last_os_error()));
        }
    }
    fs::create_dir_all(dir).map_err(bpffs_err)?;
    if !is_fs(dir, BPF_FS_MAGIC) {
        return Err(bpffs_err(io::Error::other("not on a bpf filesystem")));
    }
    Ok(())
}

fn is_fs(path: &Path, magic: i64) -> bool {
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct with a NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(cpath.as_ptr(), &mut st) == 0 && st.f_type as i64 == magic
    }
}
