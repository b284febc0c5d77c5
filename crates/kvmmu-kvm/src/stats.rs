//! KVM's binary statistics (`KVM_GET_STATS_FD`, Documentation/virt/kvm/api.rst §4.133): a header,
//! descriptors (flags, exponent, size, offset, name) and a data block of `u64`s, read with `pread`.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

/// Why the statistics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// A read or the ioctl failed.
    #[error("reading KVM stats: {0}")]
    Io(#[from] std::io::Error),
    /// The header or a descriptor is inconsistent.
    #[error("malformed KVM stats header: {0}")]
    Malformed(&'static str),
    /// vCPU statistics were asked of a VM without a vCPU.
    #[error("the VM has no vCPU")]
    NoVcpu,
}

/// One statistic: its values (one for a counter or gauge, several for a histogram) and kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvmStat {
    /// `KVM_STATS_TYPE_*` (bits 0-3 of the flags): 0 cumulative, 1 instant, 2 peak, ...
    pub kind: u32,
    /// The values.
    pub values: Vec<u64>,
}

/// All statistics of one fd, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvmStats(pub BTreeMap<String, KvmStat>);

fn pread(fd: &OwnedFd, buf: &mut [u8], off: u64) -> Result<(), StatsError> {
    let mut done = 0usize;
    while done < buf.len() {
        // SAFETY: `buf[done..]` is a valid writable buffer of the length passed.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if n == 0 {
            return Err(StatsError::Malformed("short read"));
        }
        done += n as usize;
    }
    Ok(())
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, StatsError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
        .ok_or(StatsError::Malformed("field past the end"))
}

impl KvmStats {
    /// Reads every statistic from a stats fd.
    pub fn read(fd: &OwnedFd) -> Result<KvmStats, StatsError> {
        let mut hdr = [0u8; 24];
        pread(fd, &mut hdr, 0)?;
        let name_size = u32_at(&hdr, 4)? as usize;
        let num_desc = u32_at(&hdr, 8)? as usize;
        let desc_offset = u64::from(u32_at(&hdr, 16)?);
        let data_offset = u64::from(u32_at(&hdr, 20)?);
        if num_desc > 4096 || name_size > 4096 {
            return Err(StatsError::Malformed("too many descriptors"));
        }
        let desc_size = 16 + name_size;
        let mut descs = vec![0u8; desc_size * num_desc];
        pread(fd, &mut descs, desc_offset)?;
        let mut out = BTreeMap::new();
        for d in descs.chunks(desc_size) {
            let flags = u32_at(d, 0)?;
            let size = u16::from_le_bytes([d[6], d[7]]) as usize;
            let offset = u64::from(u32_at(d, 8)?);
            let name = &d[16..];
            let name = String::from_utf8_lossy(
                &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())],
            )
            .into_owned();
            if size > 1 << 16 {
                return Err(StatsError::Malformed("stat too large"));
            }
            let mut data = vec![0u8; size * 8];
            pread(fd, &mut data, data_offset + offset)?;
            let values = data
                .chunks(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect();
            out.insert(
                name,
                KvmStat {
                    kind: flags & 0xf,
                    values,
                },
            );
        }
        Ok(KvmStats(out))
    }

    /// The first value of the statistic `name`, if the kernel has it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).and_then(|s| s.values.first().copied())
    }
}
