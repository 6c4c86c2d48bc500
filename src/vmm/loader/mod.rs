//! Loading the guest: the ELF image, checked before anything is copied, and
//! the identity-mapped page tables built in the page-table pool; and the
//! Linux boot protocol's checks and tables ([`linux`]).

pub mod elf;
pub mod linux;
pub mod pagetable;
