//! Loading the guest: the ELF image, checked before anything is copied, and
//! the identity-mapped page tables built in the page-table pool.

pub mod elf;
pub mod pagetable;
