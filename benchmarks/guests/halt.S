# VM churn guest: 16-bit real mode, three instructions; host checks AX == 3 after the HLT exit.
	.intel_syntax noprefix
	.code16
	.text
	.globl _start
_start:
	mov	ax, 1
	add	ax, 2
	hlt
