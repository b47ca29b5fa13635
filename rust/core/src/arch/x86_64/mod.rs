//! x86-64: where boot structures live, how to build them, and how to put a vCPU in a CPU mode.

/// CPUID normalization per vCPU and caller edits.
pub mod cpuid;
/// Global descriptor table entries and the segments they describe.
pub mod gdt;
/// Guest-physical addresses of the structures kvmkit writes.
pub mod layout;
/// Real, protected and long mode: the register state that enters each.
pub mod mode;
/// Identity-mapped page tables for long mode.
pub mod paging;
