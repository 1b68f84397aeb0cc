"""Where the training jobs run: no VPC, subnets brought by the platform team, or a VPC created
for them. Multi-node jobs talk between their instances (NCCL), so their security group must let
its members reach each other: SageMaker's "Give SageMaker Training Jobs Access to Resources in
Your Amazon VPC" asks for exactly that rule for distributed training."""

from __future__ import annotations

from dataclasses import dataclass

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from constructs import Construct

from .props import CreatedNetwork, ExistingNetwork


@dataclass(frozen=True)
class JobNetwork:
    """The ``VpcConfig`` of the training jobs (empty: no VPC)."""

    subnet_ids: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()


def _job_security_group(scope: Construct, vpc: ec2.IVpc) -> ec2.SecurityGroup:
    group = ec2.SecurityGroup(scope, "JobSecurityGroup", vpc=vpc, allow_all_outbound=True,
                              description="ftstack training jobs: their instances talk to each other")
    group.add_ingress_rule(group, ec2.Port.all_traffic(), "between the instances of a multi-node training job")
    return group


class TrainingNetwork(Construct):
    """``self.job``: the subnets and security groups of the training jobs, brought or created."""

    def __init__(self, scope: Construct, construct_id: str, *, network: ExistingNetwork | CreatedNetwork | None,
                 key: kms.IKey) -> None:
        super().__init__(scope, construct_id)
        self.vpc: ec2.IVpc | None = None
        if network is None:
            self.job = JobNetwork()
            return
        if isinstance(network, ExistingNetwork):
            groups = network.security_groups or (_job_security_group(self, network.vpc),)
            self.vpc = network.vpc
            self.job = JobNetwork(tuple(s.subnet_id for s in network.subnets), tuple(g.security_group_id for g in groups))
            return
        # No internet route at all (isolated subnets, no NAT): data and models reach the job
        # through the S3 gateway endpoint; the image and logs go through SageMaker's own network.
        flow_logs = logs.LogGroup(self, "FlowLogs", encryption_key=key, retention=logs.RetentionDays.ONE_YEAR,
                                  removal_policy=cdk.RemovalPolicy.RETAIN)
        self.vpc = ec2.Vpc(
            self, "Vpc", max_azs=network.max_azs, nat_gateways=0,
            subnet_configuration=[ec2.SubnetConfiguration(name="Training", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED)],
            gateway_endpoints={"S3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)},
            flow_logs={"All": ec2.FlowLogOptions(destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs))},
            # True would add a custom resource (a Lambda and a role) outside the pipeline; no job uses the default group.
            restrict_default_security_group=False,
        )
        group = _job_security_group(self, self.vpc)
        self.job = JobNetwork(tuple(s.subnet_id for s in self.vpc.isolated_subnets), (group.security_group_id,))
