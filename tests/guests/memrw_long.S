# Qword load/store, 64-bit long mode: RBX = address (8-aligned, < 512 GiB); if RBX >= 4 GiB it first maps the 2 MiB page holding RBX through a new page directory at RDI (zeroed, 4 KiB aligned, below 4 GiB) hooked into the PDPT found via CR3; then RAX = [RBX], [RBX + 8] = NOT RAX; HLT. Clobbers RCX, RDX, R8.
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
_start:
	mov	rcx, rbx
	shr	rcx, 32
	jz	2f
	# PDPT = PML4[0] & address mask (RBX < 512 GiB, so PML4 index 0)
	mov	rax, cr3
	mov	rcx, 0x000ffffffffff000
	and	rax, rcx
	mov	rax, [rax]
	and	rax, rcx
	# new PD: PD[(RBX >> 21) & 511] = (RBX & ~(2 MiB - 1)) | PS | RW | P
	mov	rdx, rbx
	shr	rdx, 21
	and	edx, 511
	mov	r8, rbx
	and	r8, -0x200000
	or	r8, 0x83
	mov	[rdi + rdx * 8], r8
	# PDPT[(RBX >> 30) & 511] = RDI | RW | P
	mov	rdx, rbx
	shr	rdx, 30
	and	edx, 511
	mov	r8, rdi
	or	r8, 3
	mov	[rax + rdx * 8], r8
	# flush the TLB
	mov	rax, cr3
	mov	cr3, rax
2:	mov	rax, [rbx]
	mov	rcx, rax
	not	rcx
	mov	[rbx + 8], rcx
	hlt
