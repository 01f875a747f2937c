//! Positioned reads, writes and range copies between files. Inputs are read with `pread`
//! (`read_exact_at`; merged bands may come from a guarded map instead, `mapped.rs`), so a
//! file truncated while it is read gives an error; outputs are written with `pwrite` at
//! their final offsets, so several threads can fill one file.

use std::fs::File;
use std::io;

/// Reads exactly `buf.len()` bytes of `file` from byte `offset`, without using or moving the
/// file's position; a file that ends before gives `UnexpectedEof`.
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match file.seek_read(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    #[cfg(not(any(unix, windows)))]
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = file;
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(buf)
    }
}

/// Writes all of `buf` into `file` at byte `offset`, without using or moving the file's
/// position.
pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match file.seek_write(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = (file, buf, offset);
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Bytes per read when a range is copied through memory.
const COPY_CHUNK: usize = 8 << 20;

/// Copies `len` bytes of `src` from byte `src_offset` into `dst` at byte `dst_offset`. On
/// Linux the kernel copies them (`copy_file_range`, which may share the blocks on file
/// systems that can); elsewhere, or when the kernel refuses, they go through a buffer of at
/// most [`COPY_CHUNK`] bytes. A source that ends early gives `UnexpectedEof`.
pub(crate) fn copy_range_at(
    src: &File,
    src_offset: u64,
    dst: &File,
    dst_offset: u64,
    len: u64,
) -> io::Result<()> {
    let mut done = 0u64;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let to_loff = |v: u64| {
            libc::loff_t::try_from(v).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        };
        while done < len {
            let mut off_in = to_loff(src_offset + done)?;
            let mut off_out = to_loff(dst_offset + done)?;
            let want = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            // SAFETY: both descriptors are open for the call (borrowed `File`s); `off_in` and
            // `off_out` point to live locals the call updates.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            match n {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n > 0 => done += n as u64,
                _ => {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => {}
                        // Not supported between these files: copy through memory.
                        Some(
                            libc::ENOSYS
                            | libc::EXDEV
                            | libc::EINVAL
                            | libc::EOPNOTSUPP
                            | libc::EPERM
                            | libc::EBADF,
                        ) if done == 0 => break,
                        _ => return Err(e),
                    }
                }
            }
        }
    }
    if done < len {
        let mut buf = vec![0u8; COPY_CHUNK.min(usize::try_from(len - done).unwrap_or(COPY_CHUNK))];
        while done < len {
            let n = buf
                .len()
                .min(usize::try_from(len - done).unwrap_or(usize::MAX));
            read_exact_at(src, &mut buf[..n], src_offset + done)?;
            write_all_at(dst, &buf[..n], dst_offset + done)?;
            done += n as u64;
        }
    }
    Ok(())
}

/// Asks the file system to reserve `len` bytes for `file` (Linux `fallocate`), so that a full
/// disk is reported before the work rather than in the middle of it. File systems that cannot
/// reserve are not an error.
pub(crate) fn reserve(file: &File, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(len) = libc::off_t::try_from(len) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the descriptor is open for the call (a borrowed `File`); plain integers.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(()),
                _ => Err(e),
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, len);
    Ok(())
}

/// Starts writing `file`'s dirty pages to disk without waiting (Linux `sync_file_range`), so
/// that the final sync finds most of the work done. A hint: failures are ignored.
pub(crate) fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the call (a borrowed `File`); plain integers.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}
