//! Positioned reads and range copies between files: the only system calls of the checkpoint
//! module. Inputs are read with `pread` (`read_exact_at`) and never memory-mapped, so a file
//! truncated while it is read gives an error, not a `SIGBUS`.

use std::fs::File;
use std::io::{self, Write};

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

/// Bytes per read when a range is copied through memory.
const COPY_CHUNK: usize = 8 << 20;

/// Appends `len` bytes of `src`, from byte `offset`, to `out` (flushed first). On Linux the
/// kernel copies them (`copy_file_range`, which may share the blocks on file systems that
/// can); elsewhere, or when the kernel refuses, they go through a buffer of [`COPY_CHUNK`]
/// bytes. A source that ends early gives `UnexpectedEof`.
pub(crate) fn copy_range(
    src: &File,
    offset: u64,
    len: u64,
    out: &mut io::BufWriter<File>,
) -> io::Result<()> {
    let mut done = 0u64;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        out.flush()?;
        let (src_fd, out_fd) = (src.as_raw_fd(), out.get_ref().as_raw_fd());
        while done < len {
            let mut off_in = libc::loff_t::try_from(offset + done)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let want = usize::try_from(len - done)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            // SAFETY: both descriptors are open for the call (borrowed `File`s); `off_in`
            // points to a live local; a null `off_out` means "at the output's position".
            let n = unsafe {
                libc::copy_file_range(src_fd, &mut off_in, out_fd, std::ptr::null_mut(), want, 0)
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
            read_exact_at(src, &mut buf[..n], offset + done)?;
            out.write_all(&buf[..n])?;
            done += n as u64;
        }
    }
    Ok(())
}
