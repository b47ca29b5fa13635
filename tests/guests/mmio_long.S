# MMIO round trip, 64-bit long mode: RBX = MMIO base A (< 4 GiB), RAX = value; stores AL->[A], AX->[A+2], EAX->[A+4], RAX->[A+8], then loads byte [A]->RCX, word [A+2]->RSI, dword [A+4]->RDI, qword [A+8]->R8 (zero-extended); HLT.
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
_start:
	mov	byte ptr [rbx], al
	mov	word ptr [rbx + 2], ax
	mov	dword ptr [rbx + 4], eax
	mov	qword ptr [rbx + 8], rax
	movzx	ecx, byte ptr [rbx]
	movzx	esi, word ptr [rbx + 2]
	mov	edi, dword ptr [rbx + 4]
	mov	r8, qword ptr [rbx + 8]
	hlt
