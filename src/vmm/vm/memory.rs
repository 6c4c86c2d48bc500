//! Guest memory: the memfd RAM, its memslots (the page-table pool and its
//! trap view), the identity map's flags per page, and the shared region.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Guest memory backed by a memfd (returned too, to pass to a daemon).
pub(crate) fn guest_memory(ram: u64) -> Result<(GuestMemoryMmap, File), VmError> {
    let size = usize::try_from(ram)
        .map_err(|_| VmError::Memory(ram, std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    let file = crate::host::memfd::create(c"sidecore-guest", ram).map_err(VmError::Memfd)?;
    let keep = file.try_clone().map_err(|e| VmError::Memory(ram, e))?;
    let region = MmapRegion::from_file(FileOffset::new(file, 0), size).map_err(VmError::MemoryMap)?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| VmError::Memory(ram, std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    Ok((GuestMemoryMmap::from_regions(vec![region]).map_err(VmError::MemoryRegions)?, keep))
}

/// The host-private block shared with a daemon: in a memfd (returned) when
/// `shareable`, else on the heap.
pub(crate) fn host_shared(pool_pages: usize, shareable: bool) -> Result<(Arc<HostShared>, Option<File>), VmError> {
    if !shareable {
        return Ok((HostShared::alloc(pool_pages).map_err(VmError::HostShared)?, None));
    }
    let size = HostShared::size(pool_pages);
    let file = crate::host::memfd::create(c"sidecore-host", size as u64).map_err(VmError::Memfd)?;
    let map = crate::host::memfd::Mapping::new(&file, 0, size).map_err(VmError::Memfd)?;
    let ptr = map.ptr();
    // SAFETY: the mapping is `size` bytes, page aligned, and stays mapped as
    // long as its owner (the Mapping) lives inside the HostShared.
    let host =
        unsafe { HostShared::from_mapping(ptr, size, pool_pages, Arc::new(map)) }.map_err(VmError::HostShared)?;
    Ok((host, Some(file)))
}

pub(super) fn host_addr(mem: &GuestMemoryMmap, gpa: u64) -> Result<u64, VmError> {
    mem.get_host_address(GuestAddress(gpa)).map(|p| p as u64).map_err(|e| VmError::GuestWrite("memslot", e))
}

/// Memslot `slot`: `size` bytes at `gpa`, backed by the memory of `mem`
/// at `backing` (equal to `gpa` except for an alias such as the pool's trap
/// view).
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_memslot(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    slot: u32,
    gpa: u64,
    backing: u64,
    size: u64,
    flags: u32,
    what: &'static str,
) -> Result<(), VmError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host_addr(mem, backing)?,
    };
    // SAFETY: the host range belongs to `mem`, which the Vm keeps alive for as
    // long as the VM fd exists (both live in the same struct; the fd is
    // dropped with it).
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| VmError::Memslot { slot, what, source })
}

/// Leaf flags for the identity map at `gpa`, or `None` to leave it unmapped.
///
/// The pool is writable in the guest's tables where it is itself the trap
/// path (a read-only memslot: `trap_gpa` 0); where a separate trap view
/// exists the guest maps the pool read-only.
pub(super) fn identity_flags(gpa: u64, vcpus: u32, image: &LoadedImage, layout: &Layout, trap_gpa: u64) -> Option<u64> {
    let vcpu_end = VCPU_AREA_GPA + u64::from(vcpus) * VCPU_AREA_STRIDE;
    match gpa {
        BOOT_INFO_GPA | GDT_GPA => Some(PTE_NX),
        g if (VCPU_AREA_GPA..vcpu_end).contains(&g) => Some(PTE_RW | PTE_NX),
        g if g < PT_POOL_GPA => None,
        // With no trap view: writable in the guest's tables, read-only in the
        // memslot, so a guest store there is the page-table service's trap
        // path (an MMIO exit).
        g if g < PT_POOL_GPA + PT_POOL_SIZE => Some(if trap_gpa == 0 { PTE_RW | PTE_NX } else { PTE_NX }),
        g if g < layout.shared_gpa => {
            let s = image.segments.iter().find(|s| g + PAGE_SIZE > s.gpa && g < s.gpa + s.mem_size)?;
            Some(if s.writable { PTE_RW } else { 0 } | if s.executable { 0 } else { PTE_NX })
        }
        _ => Some(PTE_RW | PTE_NX),
    }
}

pub(crate) fn init_region(mem: &GuestMemoryMmap, layout: &Layout, vcpus: u32) -> Result<Arc<SharedRegion>, VmError> {
    let zero = vec![0u8; usize::try_from(layout.shared_size).unwrap_or(0)];
    mem.write_slice(&zero, GuestAddress(layout.shared_gpa)).map_err(|e| VmError::GuestWrite("shared region", e))?;
    let base =
        mem.get_host_address(GuestAddress(layout.shared_gpa)).map_err(|e| VmError::GuestWrite("shared region", e))?;
    let len = usize::try_from(layout.shared_size).unwrap_or(0);
    let base = std::ptr::NonNull::new(base).ok_or(VmError::GuestWrite(
        "shared region",
        vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(layout.shared_gpa)),
    ))?;
    // The mapping lives in the guest memory's region, which stays mapped while
    // any clone of the memfd-backed GuestMemoryMmap lives; the Vm holds one
    // and the region keeps its own handle on the mapping below.
    let owner: Arc<dyn std::any::Any + Send + Sync> = Arc::new(mem.clone());
    // SAFETY: [base, base + len) is the shared region inside guest memory,
    // mapped for as long as `owner` (a clone of the memory, sharing its
    // mapping) lives; it is accessed only through shm-proto atomics.
    let region = unsafe { SharedRegion::new(base, len, vcpus, owner) }.map_err(VmError::Region)?;
    let h = base.as_ptr().cast::<RegionHeader>();
    // SAFETY: `h` is the page-aligned start of the shared region, inside
    // guest memory, and no vCPU or sidecore runs yet: these plain fields are
    // written once before anyone reads them (the heartbeat is atomic and
    // starts at zero).
    unsafe {
        std::ptr::addr_of_mut!((*h).magic).write(REGION_MAGIC);
        std::ptr::addr_of_mut!((*h).abi_version).write(shm_proto::ABI_VERSION);
        std::ptr::addr_of_mut!((*h).nr_vcpus).write(vcpus);
        std::ptr::addr_of_mut!((*h).features).write(FEATURE_CALLS);
        std::ptr::addr_of_mut!((*h).ring_slots).write(u32::try_from(RING_SLOTS).unwrap_or(0));
        std::ptr::addr_of_mut!((*h).slot_size).write(64);
        std::ptr::addr_of_mut!((*h).vcpu_offset).write(VCPU_SHARED_OFFSET);
        std::ptr::addr_of_mut!((*h).vcpu_stride).write(VCPU_SHARED_SIZE);
    }
    Ok(Arc::new(region))
}
